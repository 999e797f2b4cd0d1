"""GPU energy over a stretch of code, for joules per token next to tokens per second.

    with GpuEnergy(device_index) as e:
        run()
    e.joules, e.mean_watts, e.source

NVML through `pynvml` when it imports: the board's cumulative energy counter (Volta and later)
read before and after, else its power sampled every 50 ms. Without pynvml, `nvidia-smi
--query-gpu=power.draw` polled every 100 ms. Power sampled this way is the board's draw
averaged over the driver's own window, so short runs (under a second or two) read high or low.
The index is NVML's, which is CUDA's when CUDA_VISIBLE_DEVICES is unset.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time


class GpuEnergy:
    """Energy one GPU used during a with-block; `source` is None where none can be read."""

    def __init__(self, device_index: int = 0) -> None:
        self.index = device_index
        self.joules = float("nan")
        self.mean_watts = float("nan")
        self.seconds = 0.0
        self.source: str | None = None
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._nvml = None
        self._handle = None
        self._energy_mj: int | None = None

    def __enter__(self) -> "GpuEnergy":
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.index)
            try:
                self._energy_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                self.source = "nvml energy counter"
            except pynvml.NVMLError:
                self.source = "nvml power samples"
                self._thread = threading.Thread(target=self._sample_nvml, daemon=True)
        except Exception:   # noqa: BLE001 - no pynvml, or no NVML driver: try nvidia-smi
            self._nvml = None
            exe = shutil.which("nvidia-smi")
            if exe is not None:
                self.source = "nvidia-smi power.draw"
                self._proc = subprocess.Popen(
                    [exe, "-i", str(self.index), "--query-gpu=power.draw",
                     "--format=csv,noheader,nounits", "-lms", "100"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self._thread = threading.Thread(target=self._read_smi, daemon=True)
        self._t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.start()
        return self

    def _sample_nvml(self) -> None:
        while not self._stop.wait(0.05):
            self._samples.append(self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0)

    def _read_smi(self) -> None:
        for line in self._proc.stdout:
            try:
                self._samples.append(float(line.strip()))
            except ValueError:   # "[N/A]" on boards that do not report power
                pass

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._energy_mj is not None:
            self.joules = (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                           - self._energy_mj) / 1000.0
            self.mean_watts = self.joules / self.seconds if self.seconds else float("nan")
        elif self._samples:
            self.mean_watts = sum(self._samples) / len(self._samples)
            self.joules = self.mean_watts * self.seconds
        elif self.source is not None:
            self.source += " (no samples)"
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
