"""1,000 perturb/restore cycles leave the fp32 masters of every rank's shard bit-identical under
2-rank FSDP2 and ZeRO-3 with bf16 compute (the single-process case is in tests/unit)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import launch


@pytest.mark.parametrize("launcher,backend,ds_config", [("torchrun", "fsdp", "-"),
                                                        ("deepspeed", "zero3", "ds_configs/zero3.json")])
def test_masters_survive_a_thousand_cycles(launcher, backend, ds_config, tiny_models, tmp_path):
    out = tmp_path / "report.json"
    launch(launcher, "tests/distributed/workers/master_cycles.py", [backend, str(tiny_models["llama"]), ds_config, str(out)])
    for rank in range(2):
        report = json.loads((tmp_path / f"report.json.rank{rank}").read_text())
        assert report["dtypes"] == ["torch.float32"] and report["elements"] > 0, report
        assert report["identical"], f"rank {rank}: the masters moved"
