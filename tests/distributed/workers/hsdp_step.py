"""Worker: one MeZO step on an HSDP (replicate x shard) FSDP2 mesh, with every collective recorded.

Every collective of the step is logged with the ranks of its process group and its size (and the
profiler's count of gloo collectives is kept as a cross-check), so the test can tell which ones
cross the replicate dimension. Usage: hsdp_step.py REPLICAS MODEL_DIR OUT_JSON
"""

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single",
               "reduce_scatter_tensor", "broadcast", "all_to_all_single", "barrier", "all_gather_object")


def record_collectives(log: list[dict]) -> None:
    """Wrap torch.distributed's collectives (FSDP2 and mezo_dist call them as ``dist.<name>``) so
    each call is logged with its group's ranks and its input size. gloo's profiler events carry no
    group, so the test checks that this log accounts for every gloo collective the profiler saw."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            group = kwargs.get("group")
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            # The input is the last tensor positional for gathers (output first), the only one for all_reduce.
            t = tensors[-1] if tensors else None
            log.append({"op": _name, "ranks": ranks, "numel": t.numel() if t is not None else 0,
                        "bytes": t.numel() * t.element_size() if t is not None else 0})
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapped)


def main() -> None:
    replicas, model_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    from mezo_dist import MeZO
    from mezo_dist.distributed import init_distributed, teardown
    from mezo_dist.placement.fsdp import build_fsdp

    state = init_distributed(need_group=True, hsdp_replicas=replicas)
    placement = build_fsdp(model_dir, state, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(4, 90, (state.world_size, 16), generator=g)[state.rank : state.rank + 1]

    def closure():
        return placement.forward(input_ids=batch, labels=batch).loss

    zo = MeZO(placement, lr=1e-3, eps=1e-3, seed=1)
    zo.step(closure)  # warm-up
    log: list[dict] = []
    record_collectives(log)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        zo.step(closure)
    gloo_ops = [e.name for e in prof.events() if e.name.startswith("gloo:")]
    param = next(placement.model.parameters())
    report = {"rank": state.rank, "mesh": param.device_mesh.mesh.tolist(), "placements": [str(p) for p in param.placements],
              "collectives": log, "profiler_gloo_ops": gloo_ops}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.rank{state.rank}", "w") as f:
        json.dump(report, f)
    teardown()


if __name__ == "__main__":
    main()
