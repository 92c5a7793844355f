"""--precision bf16 over fp32 values: masters restored bit for bit, small updates kept, and a
bf16-compute run that tracks the fp32 one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mezo_dist.cli import main
from mezo_dist.distributed import DistState
from mezo_dist.placement.single import build_single
from mezo_dist.zo import noise, passes
from mezo_dist.zo.step import MeZO

CPU = DistState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="")


def masters(placement) -> dict[str, torch.Tensor]:
    return {p.name: p.local.clone() for p in placement.pieces()}


@pytest.mark.parametrize("kernel", ["compiled", "blocks"])
def test_thousand_perturb_restore_cycles_leave_masters_bit_identical(tiny_models, kernel):
    placement = build_single(str(tiny_models["llama"]), CPU, dtype=torch.float32, compute_dtype=torch.bfloat16)
    zo = MeZO(placement, lr=0.0, eps=1e-3, kernel=kernel)
    before = masters(placement)
    for cycle in range(1000):
        seed = noise.step_seed(0, cycle)
        zo.perturb(seed, 1e-3)
        zo.perturb(seed, -2e-3)
        zo.perturb(seed, 1e-3)
    after = masters(placement)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The model itself holds the masters again (no perturbation left in it).
    params = dict(placement.module.named_parameters())
    assert all(torch.equal(params[k].detach().view(-1), after[k]) for k in after)


def test_a_perturbed_model_holds_master_plus_eps_z(tiny_models):
    placement = build_single(str(tiny_models["llama"]), CPU, dtype=torch.float32, compute_dtype=torch.bfloat16)
    zo = MeZO(placement, lr=0.0, eps=1e-3)
    before = masters(placement)
    seed = noise.step_seed(1, 0)
    zo.perturb(seed, 1e-3)
    zo.perturb(seed, -2e-3)
    params = dict(placement.module.named_parameters())
    for name, m in before.items():
        z = passes.draw(zo.kernel, noise.param_key(seed, name), 0, m.numel(), m.numel())
        # The compiled kernel rounds s z, then the sum (no fused multiply-add): written out here.
        expected = m + torch.tensor(-1e-3) * z if zo.kernel == "compiled" else torch.add(m, z, alpha=-1e-3)
        assert torch.equal(params[name].detach().view(-1), expected), name
    assert all(torch.equal(before[k], v) for k, v in masters(placement).items())



def test_an_update_of_1e7_is_not_rounded_away(tiny_models):
    placement = build_single(str(tiny_models["llama"]), CPU, dtype=torch.float32, compute_dtype=torch.bfloat16)
    zo = MeZO(placement, lr=0.0, eps=1e-3)
    before = masters(placement)
    seed = noise.step_seed(2, 0)
    zo.replay(seed, projected_grad=1.0, lr=1e-7)  # theta -= 1e-7 z after a full perturbation cycle
    moved = 0
    for name, m in masters(placement).items():
        z = passes.draw(zo.kernel, noise.param_key(seed, name), 0, m.numel(), m.numel())
        expected = before[name] - 1e-7 * z
        assert torch.allclose(m, expected, rtol=0, atol=1e-8), name
        moved += int((m != before[name]).sum())
    total = sum(m.numel() for m in before.values())
    # fp32 keeps 1e-7 steps on weights below ~1; a bf16 weight would keep almost none of them.
    assert moved > 0.99 * total


def test_bf16_compute_tracks_fp32_compute(tiny_models, text_file, tmp_path):
    def run(precision: str):
        out = tmp_path / precision
        argv = ["--model_name_or_path", str(tiny_models["llama"]), "--train_file", str(text_file),
                "--output_dir", str(out), "--max_steps", "8", "--per_device_train_batch_size", "4",
                "--max_length", "24", "--learning_rate", "1e-3", "--zo_eps", "1e-2", "--precision", precision,
                "--disable_tqdm", "--report_to", "none"]
        assert main(argv) == 0
        rows = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
        from transformers import AutoModelForCausalLM

        weights = {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(out / "final").named_parameters()}
        return rows, weights

    rows32, w32 = run("fp32")
    rows16, w16 = run("bf16")
    assert all(r["precision"] == "bf16" for r in rows16) and all("precision" not in r for r in rows32)
    g32 = torch.tensor([r["projected_grad"] for r in rows32])
    g16 = torch.tensor([r["projected_grad"] for r in rows16])
    # Same seeds, same data: the estimates agree up to bf16 rounding of the forwards.
    corr = torch.corrcoef(torch.stack([g32, g16]))[0, 1].item()
    assert corr > 0.9, (g32, g16)
    assert torch.allclose(g16, g32, rtol=0.2, atol=0.05 * g32.abs().max().item()), (g32, g16)
    assert all(w16[k].dtype == torch.float32 for k in w16)
    moved = max((w32[k] - w16[k]).abs().max().item() for k in w32)
    step = max(abs(r["projected_grad"]) for r in rows32) * 1e-3 * 5  # lr |g| |z| per step, z up to ~5
    assert math.isfinite(moved) and moved < 8 * step * 0.2
