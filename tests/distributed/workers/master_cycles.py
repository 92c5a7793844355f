"""Worker: 1,000 perturb/restore cycles (+eps, -2 eps, +eps) on a sharded placement with bf16
compute over fp32 values; writes whether every rank's fp32 masters came back bit for bit.

argv: backend (fsdp | zero3), model folder, ds_config or '-', output JSON path (one file per rank).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import torch  # noqa: E402

from mezo_dist.config import ModelArguments  # noqa: E402
from mezo_dist.distributed import init_distributed, teardown  # noqa: E402
from mezo_dist.train import build_placement  # noqa: E402
from mezo_dist.zo import noise  # noqa: E402
from mezo_dist.zo.step import MeZO  # noqa: E402


def main() -> None:
    # The deepspeed launcher adds --local_rank=N; the environment carries it too.
    backend, model, ds_config, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][:4]
    state = init_distributed(use_deepspeed=backend == "zero3", need_group=backend == "fsdp")
    try:
        placement = build_placement(ModelArguments(model_name_or_path=model), state, backend=backend,
                                    ds_config=None if ds_config == "-" else ds_config, micro_batch=1,
                                    compute_dtype=torch.bfloat16)
        zo = MeZO(placement, lr=0.0, eps=1e-3)
        before = {p.name: p.local.clone() for p in placement.pieces()}
        for cycle in range(1000):
            seed = noise.step_seed(0, cycle)
            zo.perturb(seed, 1e-3)
            zo.perturb(seed, -2e-3)
            zo.perturb(seed, 1e-3)
        after = {p.name: p.local.clone() for p in placement.pieces()}
        report = {"dtypes": sorted({str(v.dtype) for v in after.values()}), "pieces": len(after),
                  "elements": sum(v.numel() for v in after.values()),
                  "identical": all(torch.equal(before[k], after[k]) for k in before)}
        with open(f"{out}.rank{state.rank}", "w", encoding="utf-8") as f:
            json.dump(report, f)
    finally:
        teardown()


if __name__ == "__main__":
    main()
