"""The Python API on models placed by the user, and what a MeZO step sends over the wire."""

from __future__ import annotations

import json

import pytest

from tests.helpers import launch


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_step_sends_one_small_all_reduce_and_lr0_restores(backend, tiny_models, tmp_path):
    out = tmp_path / "report.json"
    launch("torchrun", "tests/distributed/workers/api_step.py", [backend, str(tiny_models["opt"]), str(out)])
    report = json.loads(out.read_text())
    ops = report["collectives"]
    reduces = [c for c in ops if c["op"] == "all_reduce"]
    others = [c for c in ops if c["op"] not in ("all_reduce", "all_gather")]
    # Exactly one all-reduce, of the three numbers [sum L+, sum L-, weight]; the rest are the
    # engine's own parameter gathers. Nothing parameter-sized is reduced or broadcast.
    assert len(reduces) == 1, ops
    assert reduces[0]["shapes"] == [[3]], reduces
    assert not others, others
    assert any(c["op"] == "all_gather" for c in ops), "expected the engine's parameter gathers"
    assert report["lr0_drift"] <= 1e-6
    assert report["projected_grad"] == report["projected_grad"]  # finite, not NaN
