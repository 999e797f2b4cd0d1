"""gRPC credentials of the internal mutual TLS (common.config.InternalTLSConfig).

Both ends load the same three PEM files' kinds: their own certificate and key, and the CA
that signs every internal certificate. The worker's server requires a client certificate
(gRPC's ``require_client_auth``), so a peer without one signed by the CA fails the TLS
handshake before any RPC runs; the scheduler's channel checks the worker's certificate
against the same CA and the host it dials.
"""

from __future__ import annotations

import pathlib

import grpc

InternalTLS = tuple[str, str, str]   # (certfile, keyfile, ca)


def _read(path: str, what: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the internal TLS {what} {path}: {e.strerror}") from None


def server_credentials(tls: InternalTLS) -> grpc.ServerCredentials:
    """A server that presents ``certfile`` and accepts only clients signed by ``ca``."""
    cert, key, ca = _read(tls[0], "certificate"), _read(tls[1], "key"), _read(tls[2], "CA")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def channel_credentials(tls: InternalTLS) -> grpc.ChannelCredentials:
    """A client that presents ``certfile`` and trusts only servers signed by ``ca``."""
    cert, key, ca = _read(tls[0], "certificate"), _read(tls[1], "key"), _read(tls[2], "CA")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)
