"""Child processes, one way: spawn, wait until ready, drain output, stop by process group.

Used by `tessera serve` (tessera/launcher.py), the offline API's worker groups
(tessera/worker_group.py), the tests' helpers and the benchmarks. A `Proc` runs in a session
of its own (so that a stop reaches every process it started, e.g. torch's helpers) and has one
thread reading its output: it watches for the ready line, keeps the last lines for error
messages, and appends every line to a log file or, with TESSERA_SERVE_VERBOSE set, to our
stderr. Nothing is lost to a full pipe, and a Proc can be started again with the same command
line (`restart`), which is how `tessera serve` supervises its children.
"""

from __future__ import annotations

import collections
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import TextIO

from common.ports import free_port  # noqa: F401  (re-exported: the tests and benchmarks use it)

TESSERA = [sys.executable, "-m", "tessera.cli"]


class ProcessFailed(RuntimeError):
    """A child exited, or did not print its ready line in time; the message has its output."""


class Proc:
    """One child process, by name. `ready` is a substring of the line it prints once it
    serves (None: ready as soon as it runs). `env` is added to ours (a None value unsets)."""

    def __init__(self, name: str, argv: list[str], ready: str | None = None,
                 env: dict[str, str | None] | None = None, log: pathlib.Path | None = None,
                 tail_lines: int = 200) -> None:
        self.name, self.argv, self.ready, self.log = name, list(argv), ready, log
        self.env = None if env is None else {
            k: v for k, v in {**os.environ, **env}.items() if v is not None}
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._ready = threading.Event()

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> Proc:
        """Spawn the process (again, after it exited: same command line)."""
        self._ready.clear()
        self._tail.clear()
        self.popen = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", start_new_session=True, env=self.env)
        self.starts += 1
        if self.ready is None:
            self._ready.set()
        threading.Thread(target=self._drain, args=(self.popen,), daemon=True,
                         name=f"drain-{self.name}").start()
        return self

    def wait_ready(self, timeout: float = 300.0) -> Proc:
        """Block until the ready line was printed; ProcessFailed if the process exits first
        or the time runs out (then it is stopped)."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.popen.poll() is not None and not self._ready.is_set():
                time.sleep(0.2)   # let the drain thread read the last lines
                raise ProcessFailed(f"{self.name} exited with status {self.popen.returncode} "
                                    f"before it was ready:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessFailed(f"{self.name} was not ready within {timeout:.0f} s:\n"
                                    f"{self.output()}")
        return self

    def restart(self, timeout: float = 300.0) -> Proc:
        self.stop()
        return self.start().wait_ready(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `timeout`; the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.signal_group(signal.SIGCONT)   # a stopped process cannot handle SIGTERM
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait()
        else:
            self.signal_group(signal.SIGKILL)   # whatever the process left behind in its group
        return self.popen.returncode

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # ---- the subprocess.Popen face tests use --------------------------------------------
    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def terminate(self) -> None:
        self.popen.terminate()

    def kill(self) -> None:
        self.popen.kill()

    # ---- output -------------------------------------------------------------------------
    def output(self) -> str:
        """The last lines the process printed."""
        return "".join(self._tail)

    def _drain(self, popen: subprocess.Popen) -> None:
        verbose = bool(os.environ.get("TESSERA_SERVE_VERBOSE"))
        sink: TextIO | None = self.log.open("a") if self.log is not None else None
        try:
            for line in popen.stdout:
                self._tail.append(line)
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                elif verbose:
                    sys.stderr.write(f"[{self.name}] {line}")
                if self.ready is not None and self.ready in line:
                    self._ready.set()
        finally:
            if sink is not None:
                sink.close()


class ProcessGroup:
    """Processes stopped together, in reverse order of their start."""

    def __init__(self, procs: list[Proc] | None = None) -> None:
        self.procs: list[Proc] = list(procs or [])

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def start(self, name: str, argv: list[str], ready: str | None = None,
              env: dict[str, str] | None = None, timeout: float = 300.0,
              log: pathlib.Path | None = None) -> Proc:
        return self.add(Proc(name, argv, ready, env, log)).start().wait_ready(timeout)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen is not None and proc.poll() is None:
                proc.signal_group(signal.SIGCONT)
                proc.signal_group(signal.SIGTERM)
        for proc in reversed(self.procs):
            proc.stop()


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


class RedisProc(Proc):
    """A private redis-server on a free port (`.url`). With AOF (appendfsync everysec) a
    restart of the server loses at most about a second of writes; `restart` keeps the port."""

    def __init__(self, workdir: pathlib.Path | str, port: int | None = None,
                 appendonly: bool = True) -> None:
        exe = redis_server_path()
        if exe is None:
            raise FileNotFoundError("redis-server is not installed "
                                    "(apt-get install redis-server)")
        self.port = port or free_port()
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly
                       else ["--appendonly", "no"])
        super().__init__("redis", [exe, "--port", str(self.port), "--bind", "127.0.0.1",
                                   "--save", "", *persistence, "--dir", str(workdir)],
                         "Ready to accept connections")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"
