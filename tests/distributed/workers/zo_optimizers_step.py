"""Worker: every zeroth-order optimizer on one placement, from the same start, in one run.

Builds the placement the launch path builds (``single``, ``fsdp`` or ``zero3`` with the shipped
forward-only ds_config), then for each optimizer: puts the initial parameters back, runs STEPS
steps on a fixed global batch split across the ranks, records the collectives of some steps with
the profiler, and saves the gathered parameters (rank 0). Usage:
zo_optimizers_step.py {single,fsdp,zero3} MODEL_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

STEPS = 4
# name -> (constructor arguments, steps whose collectives are recorded)
CASES = {
    "fzoo": ({"lr": 2e-6, "num_directions": 3}, [1]),
    "sparse": ({"lr": 1e-3, "sparsity": 0.5, "sparse_refresh": 2, "num_directions": 2}, [1, 2]),
    "adamezo": ({"lr": 1e-3, "history": 3, "beta1": 0.8}, [1]),
}


def collectives(prof) -> list[dict]:
    prefix = "gloo:"
    return [{"op": e.name[len(prefix):], "shapes": e.input_shapes} for e in prof.events() if e.name.startswith(prefix)]


def main() -> None:
    # The deepspeed launcher puts --local_rank=N first; the environment carries it anyway.
    backend, model_dir, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out = Path(out)
    from safetensors.torch import save_file

    from mezo_dist.checkpoint import load_checkpoint, save_checkpoint
    from mezo_dist.config import ModelArguments
    from mezo_dist.distributed import init_distributed, teardown
    from mezo_dist.objectives import causal_lm_loss
    from mezo_dist.placement.build import build_placement
    from mezo_dist.zo import optimizers

    state = init_distributed(use_deepspeed=backend == "zero3", need_group=backend == "fsdp")
    placement = build_placement(ModelArguments(model_name_or_path=model_dir), state, backend=backend,
                                ds_config="ds_configs/zero3.json" if backend == "zero3" else None,
                                micro_batch=4 // state.world_size)
    # The start, put back before each optimizer through the layout-invariant checkpoint format
    # (an export can change which pieces a rank holds whole).
    save_checkpoint(placement, out / "start", {"step": 0, "skipped_steps": 0})
    ids = torch.randint(4, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    rows_per_rank = 4 // state.world_size
    mine = ids[state.rank * rows_per_rank : (state.rank + 1) * rows_per_rank]
    batch = {"input_ids": mine, "attention_mask": torch.ones_like(mine), "labels": mine}
    report = {}
    for name, (kw, recorded) in CASES.items():
        load_checkpoint(placement, out / "start")
        zo = optimizers.build(name, placement, eps=1e-3, weight_decay=0.1, seed=5, **kw)
        rows, ops = [], {}
        for step in range(STEPS):
            if step in recorded:
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    res = zo.step(lambda: causal_lm_loss(placement, batch))
                ops[step] = collectives(prof)
            else:
                res = zo.step(lambda: causal_lm_loss(placement, batch))
            rows.append({"seed": res.step_seed, "loss": res.loss, "directions": [list(d) for d in res.directions]})
        sd = placement.full_state_dict()
        report[name] = {"rows": rows, "collectives": ops, "state": optimizers.state_dict(zo),
                        "parameters": len({p.name for p in placement.pieces()})}
        if state.is_main:
            save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(out / f"{name}.safetensors"))
    if state.is_main:
        (out / "report.json").write_text(json.dumps(report))
    teardown()


if __name__ == "__main__":
    main()
