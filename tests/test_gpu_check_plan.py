"""scripts/gpu_check.sh plans to fit its budget (GPU time is scarce: a step that overruns
costs a rerun). `--dry-run` prints the plan on any machine, without Python or a GPU."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _dry_run(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": "/nonexistent/python", **env})


def test_dry_run_plan_fits_the_budget_with_margin():
    proc = _dry_run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = re.findall(r"^  (\S+)\s+(\d+)s  ", proc.stdout, re.M)
    names, limits = [n for n, _ in steps], [int(s) for _, s in steps]
    # The one real capture test runs early and alone, right after the setup.
    assert names[:2] == ["setup", "cuda-graphs"]
    assert {"kernel-tests-cuda", "runner-cuda-vs-cpu", "model-equivalence", "offline-throughput",
            "kernel-benchmark", "serve-bench", "tp2-nccl"} <= set(names)
    total, margin, budget = map(int, re.search(
        r"^total: (\d+)s of step limits \+ (\d+)s margin = \d+s, budget (\d+)s$", proc.stdout,
        re.M).groups())
    assert total == sum(limits) and budget == 470
    assert total + margin <= budget and margin >= 0.05 * budget
    assert all(20 <= limit <= 120 for limit in limits)


def test_dry_run_refuses_a_plan_over_budget():
    proc = _dry_run(GPU_CHECK_BUDGET_S="300")
    assert proc.returncode == 1 and "exceeds its budget" in proc.stdout


def test_the_check_runs_offline_and_on_cuda():
    text = SCRIPT.read_text()
    assert "HF_HUB_OFFLINE=1" in text and "PY=${PYTHON:-python3}" in text
    assert "TESSERA_TEST_DEVICE=cuda" in text          # equivalence with our side on the GPU
    assert "trap summary EXIT" in text                 # the table, whatever happens
