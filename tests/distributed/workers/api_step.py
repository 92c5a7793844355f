"""Worker for 2-rank tests of the Python API on models the *user* placed.

Builds a tiny model, places it as a user would (``fully_shard`` by hand, or
``deepspeed.initialize`` without an optimizer), wraps it with ``mezo_dist.wrap`` and reports:
the collectives issued during one MeZO step (recorded by the profiler), and how far a step
with lr = 0 moves any parameter. Usage: api_step.py {fsdp,zero3} MODEL_DIR OUT_JSON
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile


def build(backend: str, model_dir: str):
    from transformers import AutoModelForCausalLM

    if backend == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 200}}
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841 - transformers reads it while loading
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    return engine, engine


def collectives(prof, backend: str) -> list[dict]:
    prefix = "gloo:"
    return [
        {"op": e.name[len(prefix):], "shapes": e.input_shapes}
        for e in prof.events()
        if e.name.startswith(prefix)
    ]


def main() -> None:
    backend, model_dir, out = sys.argv[1:4]
    from mezo_dist import MeZO, wrap
    from mezo_dist.distributed import teardown

    model, call = build(backend, model_dir)
    placement = wrap(model)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(4, 90, (4, 16), generator=g)[rank * 2 : rank * 2 + 2]

    def closure():
        return call(input_ids=batch, labels=batch).loss

    zo = MeZO(placement, lr=1e-3, eps=1e-3, seed=1)
    zo.step(closure)  # warm-up: DeepSpeed traces its first forward
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        result = zo.step(closure)
    ops = collectives(prof, backend)

    before = placement.full_state_dict()
    frozen = MeZO(placement, lr=0.0, eps=1e-3, seed=2)
    frozen.step(closure)
    after = placement.full_state_dict()
    drift = max((before[k] - after[k]).abs().max().item() for k in before) if rank == 0 else None
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"collectives": ops, "lr0_drift": drift, "projected_grad": result.projected_grad}, f)
    teardown()


if __name__ == "__main__":
    main()
