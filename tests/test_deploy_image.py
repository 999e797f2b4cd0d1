"""The container image's recipe (scripts/docker/Dockerfile) and its health check.

No Docker engine is needed: what is checked is what could silently drift — the install step
being the README's setup script, the package stand-ins of the dependency layer matching the
packages pyproject.toml installs, .dockerignore keeping what the image needs — and the health
check's behaviour against a real HTTP server."""

from __future__ import annotations

import http.server
import re
import threading

import pytest

from compose_stack import REPO
from tessera import healthcheck

DOCKERFILE = (REPO / "scripts" / "docker" / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), as Docker reads them: comment lines dropped (inside a
    continued instruction too), continuations joined, whitespace runs made one space."""
    kept = [l for l in DOCKERFILE.splitlines() if not l.strip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(kept))
    lines = [" ".join(l.split()) for l in joined.splitlines() if l.strip()]
    return [(l.split(" ", 1)[0].upper(), l.split(" ", 1)[1] if " " in l else "") for l in lines]


def test_dependencies_install_through_the_readme_script_before_the_source_arrives():
    steps = instructions()
    install = next(i for i, (op, arg) in enumerate(steps) if op == "RUN" and "bash scripts/setup.sh" in arg)
    source = steps.index(("COPY", ". ."))
    assert install < source
    copied_before = [arg for op, arg in steps[:install] if op == "COPY"]
    assert copied_before == ["pyproject.toml ./", "scripts/setup.sh scripts/setup.sh"]
    # the empty stand-ins must be exactly the packages the editable install maps
    include = re.search(r'include = \[(.*?)\]', (REPO / "pyproject.toml").read_text()).group(1)
    packages = {p.strip(' "*') for p in include.split(",")}
    stand_ins = set(re.search(r"for p in ([\w ]+); do", steps[install][1]).group(1).split())
    assert stand_ins == packages


def test_the_image_runs_as_a_non_root_user_and_reads_models_from_slash_models():
    users = [arg for op, arg in instructions() if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "mkdir -p /models" in DOCKERFILE and f"chown {users[-1]}:{users[-1]} /models" in DOCKERFILE
    assert ("HEALTHCHECK", '--interval=10s --timeout=5s --start-period=120s --retries=3 '
            'CMD ["python", "-m", "tessera.healthcheck"]') in instructions()


def test_dockerignore_keeps_what_the_image_installs():
    ignored = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    needed = ["pyproject.toml", "scripts", "common", "kernels", "worker", "scheduler", "gateway",
              "tessera"]
    assert not set(ignored) & set(needed)
    assert ".venv" in ignored and "models" in ignored


@pytest.fixture
def http_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ready" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_healthcheck_is_healthy_only_when_every_url_answers_2xx(http_server, monkeypatch):
    monkeypatch.delenv("TESSERA_HEALTH_URL", raising=False)
    assert healthcheck.main([http_server + "/ready"]) == 0
    assert healthcheck.main([http_server + "/ready", http_server + "/not-ready"]) == 1
    assert healthcheck.main(["http://127.0.0.1:1/ready"]) == 1     # nothing listens
    port = int(http_server.rsplit(":", 1)[1])
    assert healthcheck.main([f"tcp://127.0.0.1:{port}"]) == 0
    assert healthcheck.main([http_server + "/ready", "tcp://127.0.0.1:1"]) == 1
    assert healthcheck.main([]) == 0                                # no check applies
    monkeypatch.setenv("TESSERA_HEALTH_URL", http_server + "/not-ready")
    assert healthcheck.main([]) == 1
