"""1,000 perturb/restore cycles leave the fp32 masters of every rank's shard bit-identical under
2-rank FSDP2 and ZeRO-3 with bf16 compute (the single-process case is in tests/unit)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ROOT


def cycles(state, backend: str, model: str) -> dict:
    from mezo_dist.config import ModelArguments
    from mezo_dist.placement.build import build_placement
    from mezo_dist.zo import noise
    from mezo_dist.zo.step import MeZO

    ds_config = str(ROOT / "ds_configs" / "zero3.json") if backend == "zero3" else None
    placement = build_placement(ModelArguments(model_name_or_path=model), state, backend=backend,
                                ds_config=ds_config, micro_batch=1, compute_dtype=torch.bfloat16)
    zo = MeZO(placement, lr=0.0, eps=1e-3)
    before = {p.name: p.local.clone() for p in placement.pieces()}
    for cycle in range(1000):
        seed = noise.step_seed(0, cycle)
        zo.perturb(seed, 1e-3)
        zo.perturb(seed, -2e-3)
        zo.perturb(seed, 1e-3)
    after = {p.name: p.local.clone() for p in placement.pieces()}
    return {"dtypes": sorted({str(v.dtype) for v in after.values()}), "pieces": len(after),
            "elements": sum(v.numel() for v in after.values()),
            "identical": all(torch.equal(before[k], after[k]) for k in before)}


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_masters_survive_a_thousand_cycles(backend, rank_pool, tiny_models):
    for rank, report in enumerate(rank_pool.run(cycles, backend, str(tiny_models["llama"]))):
        assert report["dtypes"] == ["torch.float32"] and report["elements"] > 0, report
        assert report["identical"], f"rank {rank}: the masters moved"
