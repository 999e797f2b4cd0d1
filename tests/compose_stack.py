"""Run compose.yaml's services as local processes, the way `docker compose up` would run them.

What a container gives a process is translated, and nothing else is touched: the file's own
commands, environment, healthchecks and depends_on conditions are used verbatim after
compose's `${VAR:-default}` interpolation, with
- service names (and network aliases) as hosts mapped to 127.0.0.1, `0.0.0.0` binds too;
- each volume's mount point mapped to a local directory (named volumes: one temp dir each);
- `tessera` and `python` found in this interpreter's bin directory, the image's PATH.
So a flag, variable, port or path the file gets wrong fails here as it would in a container.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "compose.yaml"

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation: ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?err}
    and $$ for a literal $, applied to every string in the loaded file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(5)
        colon, kind, arg = m.group(2), m.group(3), m.group(4)
        current = env.get(name)
        missing = current is None or (colon == ":" and current == "")
        if kind == "-" and missing:
            return arg
        if kind == "?" and missing:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return current or ""

    return _VAR.sub(sub, value)


def load(env: Mapping[str, str], path: pathlib.Path = COMPOSE_FILE) -> dict[str, Any]:
    return interpolate(yaml.safe_load(path.read_text()), env)


def default_services(config: dict[str, Any]) -> list[str]:
    """The services `docker compose up` starts with no profile given, in dependency order."""
    services = {n: s for n, s in config["services"].items() if not s.get("profiles")}
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in depends_on(services[name]):
                visit(dep)
            order.append(name)

    for name in services:
        visit(name)
    return order


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


def published_port(service: dict[str, Any], container_port: int) -> int:
    """The host port that `ports:` publishes for a container port."""
    for spec in service.get("ports", []):
        parts = str(spec).split("/")[0].split(":")
        if int(parts[-1]) == container_port:
            return int(parts[-2])
    raise KeyError(f"container port {container_port} is not published")


@dataclass
class LocalStack:
    """Processes of one compose project on this machine."""

    config: dict[str, Any]
    workdir: pathlib.Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, pathlib.Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hosts = set(self.config["services"])
        for s in self.config["services"].values():
            for net in (s.get("networks") or {}).values() if isinstance(s.get("networks"), dict) else []:
                hosts.update((net or {}).get("aliases", []))
        self._host = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, sorted(hosts))) + r")(?=:\d)")

    def _volume_dir(self, source: str) -> pathlib.Path:
        if source.startswith((".", "/", "~")):
            return (REPO / source).expanduser().resolve()
        path = self.workdir / "volumes" / source
        path.mkdir(parents=True, exist_ok=True)
        return path

    def localize(self, name: str, text: str) -> str:
        """A container's view of hosts, binds and mount points, translated to this machine."""
        text = self._host.sub("127.0.0.1", text).replace("0.0.0.0", "127.0.0.1")
        for spec in self.config["services"][name].get("volumes", []):
            source, target = str(spec).split(":")[:2]
            text = re.sub(r"(?<![\w/.])" + re.escape(target) + r"(?=/|\b|$)",
                          str(self._volume_dir(source)), text)
        return text

    def process_env(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
        environment = self.config["services"][name].get("environment") or {}
        if isinstance(environment, list):
            environment = dict(e.split("=", 1) for e in environment)
        env.update({k: self.localize(name, str(v)) for k, v in environment.items()})
        return env

    def start(self, name: str) -> None:
        argv = [self.localize(name, str(a)) for a in self.config["services"][name]["command"]]
        cwd = self.workdir / "cwd" / name
        cwd.mkdir(parents=True, exist_ok=True)
        self.logs[name] = self.workdir / f"{name}.log"
        with open(self.logs[name], "w") as log:
            self.procs[name] = subprocess.Popen(argv, cwd=cwd, env=self.process_env(name),
                                                stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def healthcheck(self, name: str) -> bool:
        test = self.config["services"][name]["healthcheck"]["test"]
        kind, rest = test[0], [self.localize(name, str(a)) for a in test[1:]]
        argv = ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest
        result = subprocess.run(argv, env=self.process_env(name), capture_output=True, timeout=30)
        return result.returncode == 0

    def _died(self) -> str | None:
        """A long-running service that exited (compose would restart it; here it is a failure)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None and self.config["services"][name].get("restart") != "no":
                return name
        return None

    def wait(self, name: str, condition: str, deadline: float) -> None:
        proc = self.procs[name]
        while time.monotonic() < deadline:
            died = self._died()
            if died is not None and died != name:
                raise RuntimeError(f"{died} exited with {self.procs[died].returncode} while "
                                   f"waiting for {name}:\n" + self.log(died))
            if condition == "service_completed_successfully":
                if proc.poll() is not None:
                    if proc.returncode == 0:
                        return
                    break
            elif proc.poll() is not None:
                break
            elif condition == "service_started" or self.healthcheck(name):
                return
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not reach {condition} (exit {proc.poll()}):\n" + self.log(name))

    def up(self, timeout_s: float = 240) -> None:
        """`docker compose up --wait`: start the default services in order, each once its
        depends_on conditions hold, then wait until every healthcheck passes."""
        deadline = time.monotonic() + timeout_s
        reached: set[tuple[str, str]] = set()
        for name in default_services(self.config):
            for dep, condition in depends_on(self.config["services"][name]).items():
                if (dep, condition) not in reached:
                    self.wait(dep, condition, deadline)
                    reached.add((dep, condition))
            self.start(name)
        for name in self.procs:
            if "healthcheck" in self.config["services"][name]:
                self.wait(name, "service_healthy", deadline)

    def log(self, name: str) -> str:
        return self.logs[name].read_text()[-4000:] if name in self.logs else ""

    def down(self) -> dict[str, int | None]:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

