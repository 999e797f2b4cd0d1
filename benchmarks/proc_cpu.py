"""CPU seconds of a process tree, in total and per role of the `tessera serve` stack (Linux /proc).

CPU time, unlike wall time, barely moves with the load that other programs put on the machine:
on a 2-core machine every CPU second the gateway, scheduler or Redis spend is taken from the
model's matmuls, so this is where the stack's overhead shows.
"""

from __future__ import annotations

import os
import pathlib

# `tessera serve` starts its children as `python -m tessera.cli ROLE ...` (tessera/procs.py)
# and Redis as `redis-server`; anything else (a compiler a worker ran, ...) counts for the
# nearest ancestor with a role.
ROLES = ("serve", "gateway", "scheduler", "worker", "redis-server")


def _snapshot() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, CPU ticks user + system, process name)."""
    procs = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            head, tail = text.rsplit(")", 1)
            fields = tail.split()
        except (OSError, ValueError):
            continue   # the process ended meanwhile
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]),
                                        head.split("(", 1)[1])
    return procs


def _role(pid: int, name: str) -> str | None:
    if name == "redis-server":
        return "redis-server"
    try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in argv]
    if "tessera.cli" in argv:
        i = argv.index("tessera.cli")
        if i + 1 < len(argv) and argv[i + 1] in ROLES:
            return argv[i + 1]
    return None


def _tree(root: int):
    """(pid, role, CPU ticks) of `root` and its live descendants; a child without a role of
    its own takes its parent's."""
    procs = _snapshot()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    todo = [(root, "other")]
    while todo:
        pid, inherited = todo.pop()
        if pid not in procs:
            continue
        _, ticks, name = procs[pid]
        role = _role(pid, name) or inherited
        yield pid, role, ticks
        todo.extend((c, role) for c in children.get(pid, ()))


def tree_cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds of `root` and its live descendants, summed per role (ROLES, or "other"),
    and in total under "total"."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for _, role, ticks in _tree(root):
        out[role] = out.get(role, 0.0) + ticks / tick
    out["total"] = sum(out.values())
    return out


def role_pids(root: int, role: str) -> list[int]:
    """The pids of `root`'s tree that have `role`."""
    return [pid for pid, r, _ in _tree(root) if r == role]


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) of a process and all its live descendants: the whole stack
    under `tessera serve`."""
    return tree_cpu_by_role(root)["total"]


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Per-role CPU seconds between two tree_cpu_by_role snapshots (a role that appeared
    between them counts from zero)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}
