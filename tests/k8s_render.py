"""Render the kustomize overlays in k8s/ and read what their containers will run.

`kubectl kustomize` does the rendering (the kubectl that scripts/setup.sh --test installs
into the virtual environment, else one on PATH). A container's args are resolved the way
the kubelet does: `$(VAR)` from its env and envFrom ConfigMaps.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any

import yaml

K8S = pathlib.Path(__file__).resolve().parent.parent / "k8s"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


def kubectl() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "kubectl")
    return beside if os.access(beside, os.X_OK) else shutil.which("kubectl")


def build(overlay: str, components: tuple[str, ...], workdir: pathlib.Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay, plus components when given (through a kustomization
    in workdir that adds them, as a user's own overlay would)."""
    target = K8S / "overlays" / overlay
    if components:
        rel = os.path.relpath(K8S, workdir)
        (workdir / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"{rel}/overlays/{overlay}"],
            "components": [f"{rel}/components/{c}" for c in components]}))
        target = workdir
    out = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {target} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = find(docs, kind, name)
    return doc


def containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, container) for every main container of every workload."""
    return [(w, c) for w in docs if w["kind"] in WORKLOAD_KINDS
            for c in w["spec"]["template"]["spec"]["containers"]]


def container_env(docs: list[dict], workload: dict, container: dict) -> dict[str, str]:
    """The variables the kubelet gives the container. A downward-API field becomes what it
    would be in the first pod; a Secret reference becomes a placeholder naming it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in (var.get("valueFrom") or {}):
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[var["name"]] = workload["metadata"]["name"] + "-0"
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"redis://secret-{ref['name']}-{ref['key']}:6379/0"
    return env


def resolved_argv(docs: list[dict], workload: dict, container: dict) -> list[str]:
    """command + args with $(VAR) expanded; an unknown $(VAR) is left as is, as the kubelet
    does, and fails the flag parsing that follows."""
    env = container_env(docs, workload, container)
    expand = lambda s: re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                              lambda m: env.get(m.group(1), m.group(0)), str(s))
    return [expand(a) for a in container.get("command", []) + container.get("args", [])]


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels / matchExpressions In) matches labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True
