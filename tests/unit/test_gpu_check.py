"""The GPU check's CPU-side parts: its CUDA-only tests collect, and its benchmark runs end to end
on a tiny OPT and writes its results (the figures themselves need a GPU)."""

from __future__ import annotations

import json
import subprocess

from tests.helpers import ROOT, launch_env


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    collected = (tmp_path / "gpu_tests.txt").read_text()
    assert "tests/gpu/" in collected
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["meta"]["dry_run"] is True
    row = result["rows"][0]
    assert row["kernels"] and all(v["step_s"] > 0 and v["perturb_pass_s"] > 0 for v in row["kernels"].values())
    assert row["planner_bytes"] > 0 and (tmp_path / "gpu_check.md").is_file()
