"""Who is asking: API keys, tenants, and the guards that check them on both faces.

Keys are never stored: a tenants file holds their SHA-256 hex digests (``tessera hash-key``
prints one), and a presented key is hashed and compared in constant time against every
digest (``hmac.compare_digest``), so neither a mismatch's position nor which tenant it nearly
matched shows in the timing. ``--api-key KEY`` is the one-tenant form (vLLM's flag).

With no key configured the gateway is open, as before: every request belongs to the tenant
``""``. With keys, every ``/v1/*`` route and every ``tessera.v1.Generate`` method needs
``Authorization: Bearer <key>`` (HTTP header or gRPC metadata); ``/health``, ``/ready``,
``/metrics``, ``/docs`` and the gRPC health and reflection services stay open: they carry no
prompt data.

The tenants file is JSON, reloaded on SIGHUP (a bad file keeps the old tenants and logs why)::

    {"tenants": [{"name": "team-a", "api_key_sha256": "<64 hex>", "requests_per_minute": 60,
                  "tokens_per_minute": 100000, "max_concurrent_requests": 8,
                  "weight": 1.0, "priority": 0}]}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import pathlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UNAUTHENTICATED = "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'."
OPEN_TENANT = ""   # the tenant of every request when no key is configured


def hash_key(key: str) -> str:
    """The digest a tenants file stores for ``key`` (``tessera hash-key``)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """One tenant's identity and limits; ``None`` means unlimited."""
    name: str
    api_key_sha256: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    max_queued_requests: int | None = None   # admitted, no output yet (gateway.limits)
    weight: float = 1.0        # fair share in the scheduler (tokens served / weight)
    priority: int = 0          # lower first, within the tenant (vLLM's convention)

    @classmethod
    def from_json(cls, d: Mapping[str, object], where: str) -> Tenant:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        name, digest = d.get("name"), str(d.get("api_key_sha256", "")).lower()
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}.name: 1-64 characters of [A-Za-z0-9._-]")
        if not _HEX64.match(digest):
            raise ValueError(f"{where}.api_key_sha256: 64 hex digits (tessera hash-key KEY)")
        limits: dict[str, int | None] = {}
        for field_name in ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests",
                           "max_queued_requests"):
            v = d.get(field_name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                  or not 1 <= v <= 2**40):
                raise ValueError(f"{where}.{field_name}: an integer in [1, 2^40] or null")
            limits[field_name] = v
        weight = d.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not 1e-3 <= weight <= 1e6:
            raise ValueError(f"{where}.weight: a number in [0.001, 1e6]")
        priority = d.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) \
                or not -2**31 <= priority < 2**31:
            raise ValueError(f"{where}.priority: a 32-bit integer")
        return cls(name, digest, weight=float(weight), priority=priority, **limits)


class Tenants:
    """The configured tenants; ``authenticate`` maps a presented key to one of them.

    Empty means authentication is off (the open tenant serves everyone)."""

    def __init__(self, tenants: Iterable[Tenant] = (), path: str | None = None) -> None:
        self._tenants = tuple(tenants)
        self.path = path
        names = [t.name for t in self._tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")

    @classmethod
    def from_settings(cls, api_key: str | None = None, tenants_file: str | None = None) -> Tenants:
        if api_key and tenants_file:
            raise ValueError("give --api-key or --tenants, not both")
        if api_key:
            return cls([Tenant("default", hash_key(api_key))])
        if tenants_file:
            return cls(_read(tenants_file), tenants_file)
        return cls()

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def __iter__(self):
        return iter(self._tenants)

    def get(self, name: str) -> Tenant | None:
        return next((t for t in self._tenants if t.name == name), None)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key ``authorization`` ("Bearer KEY") carries, else None.

        NOTE: every digest is compared (no early exit), in constant time each."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        presented = hash_key(key.strip()).encode()
        found = None
        for t in self._tenants:
            if hmac.compare_digest(presented, t.api_key_sha256.encode()):
                found = t
        return found

    def reload(self) -> None:
        """Re-read the tenants file (SIGHUP); a file that fails to parse keeps the old set."""
        if not self.path:
            return
        try:
            fresh = _read(self.path)
            Tenants(fresh)   # uniqueness
        except (OSError, ValueError) as e:
            logger.error("tenants file %s not reloaded: %s", self.path, e)
            return
        self._tenants = tuple(fresh)
        logger.info("tenants file %s reloaded: %d tenants", self.path, len(self._tenants))


def _read(path: str) -> list[Tenant]:
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"tenants file {path}: not JSON ({e})") from None
    items = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"tenants file {path}: expected {{\"tenants\": [...]}} with one or more")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"tenants file {path}: tenants[{i}] is not an object")
        out.append(Tenant.from_json(item, f"{path}: tenants[{i}]"))
    return out


def error_body_401() -> bytes:
    return json.dumps({"error": {"message": UNAUTHENTICATED, "type": "invalid_request_error",
                                 "param": None, "code": "invalid_api_key"}}).encode()


class HttpAuth:
    """ASGI guard of the ``/v1/`` routes: 401 without a valid key; the tenant otherwise goes
    to ``request.state.tenant`` (a name; the open tenant when authentication is off)."""

    def __init__(self, app: ASGIApp, tenants: Tenants) -> None:
        self.app = app
        self.tenants = tenants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tenant = OPEN_TENANT
        path = scope.get("path", "")
        if self.tenants.enabled and (path == "/v1" or path.startswith("/v1/")):
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                           if k == b"authorization"), None)
            found = self.tenants.authenticate(header)
            if found is None:
                body = error_body_401()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
            tenant = found.name
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def grpc_tenant(tenants: Tenants, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The tenant name of a gRPC call's ``authorization`` metadata; None if refused."""
    if not tenants.enabled:
        return OPEN_TENANT
    header = next((v for k, v in (metadata or ()) if k == "authorization"), None)
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    found = tenants.authenticate(header)
    return None if found is None else found.name


class GrpcAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a ``tessera.v1.Generate`` call without a valid key (health and
    reflection stay open). The servicer reads the tenant again with ``grpc_tenant``."""

    def __init__(self, tenants: Tenants, service: str) -> None:
        self.tenants = tenants
        self.prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        if grpc_tenant(self.tenants, handler_call_details.invocation_metadata) is not None:
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
            yield  # pragma: no cover - abort raises

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            deny, handler.request_deserializer, handler.response_serializer)
