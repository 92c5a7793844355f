"""Bytes on the wire per training step: MeZO against the backprop baseline.

For 2-rank FSDP2, 2-rank DeepSpeed ZeRO-3 and (``--hsdp``) FSDP2 on a 2 x 2 hybrid mesh of 4
ranks, each trainer builds its placement with the training code (``build_placement``), takes one
warm-up step, then ``--steps`` steps with every collective recorded, and the totals are divided
by the steps. Recording works as in the collective tests (``tests/distributed/workers/
hsdp_step.py``): ``torch.distributed``'s collectives are wrapped so that each call is logged
with its name, its group's ranks and its size, and ``torch.profiler`` counts the gloo operations
over the same window as a cross-check that nothing escaped the log.

Size of a collective: its full payload, the largest tensor (or tensor list) among its arguments:
the gathered output of an all-gather, the unreduced input of a reduce-scatter, the tensor of an
all-reduce. Each rank sends and receives about (ranks - 1) / ranks of that (ring algorithms).

    python benchmarks/comm_volume.py                # fsdp x2 and zero3 x2, MeZO and AdamW
    python benchmarks/comm_volume.py --hsdp         # also the 2 x 2 HSDP mesh on 4 ranks

Results: ``benchmarks/results/comm_volume.{json,md,png}`` (the chart needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import (  # noqa: E402
    adamw_torch_config,
    describe_opt,
    machine,
    parser,
    pyplot,
    random_opt,
    run_ranks,
    save_figure,
    write_results,
)

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single",
               "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
               "all_reduce_coalesced", "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter",
               "all_gather_object", "broadcast_object_list")
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "other")


def kind(op: str) -> str:
    if "all_gather" in op and "object" not in op:
        return "all_gather"
    if "reduce_scatter" in op:
        return "reduce_scatter"
    if "all_reduce" in op:
        return "all_reduce"
    return "other"


def payload(args, kwargs) -> tuple[int, int]:
    """(elements, bytes) of the largest tensor or tensor list among a collective's arguments."""
    import torch

    best = (0, 0)
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            cand = (a.numel(), a.numel() * a.element_size())
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            cand = (sum(t.numel() for t in a), sum(t.numel() * t.element_size() for t in a))
        else:
            continue
        best = max(best, cand, key=lambda c: c[1])
    return best


def record_collectives(log: list[dict]) -> None:
    """Wrap ``torch.distributed``'s collectives (FSDP2, DeepSpeed's comm layer and mezo_dist all
    call them through the module) so that each call is logged with its group's ranks and size."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            group = kwargs.get("group")
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            numel, nbytes = payload(args, kwargs)
            log.append({"op": _name, "ranks": ranks, "numel": numel, "bytes": nbytes})
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapped)


ELEMENT_BYTES = {"float": 4, "double": 8, "long int": 8, "int": 4, "c10::BFloat16": 2, "c10::Half": 2,
                 "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1}


def gloo_events(prof) -> list[list]:
    """[name, elements, bytes] of every gloo collective the profiler saw (its input tensor: the
    local shard for an all-gather, the whole tensor for an all-reduce or broadcast)."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if not e.name().startswith("gloo:"):
            continue
        numel = nbytes = 0
        for shape, dtype in zip(e.shapes(), e.dtypes()):
            n = 1
            for d in shape:
                n *= d
            numel += n
            nbytes += n * ELEMENT_BYTES.get(dtype, 4)
        out.append([e.name()[len("gloo:"):], numel, nbytes])
    return out


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mezo_dist.config import BackpropArguments, ModelArguments
    from mezo_dist.distributed import init_distributed, teardown
    from mezo_dist.objectives import MicroBatch, causal_lm_loss
    from mezo_dist.placement.build import build_placement
    from mezo_dist.zo.step import MeZO

    backprop = args.method == "backprop"
    state = init_distributed(use_deepspeed=args.backend == "zero3", need_group=args.backend == "fsdp",
                             hsdp_replicas=args.hsdp_replicas)
    try:
        bp_args = BackpropArguments(trainer="regular") if backprop else None
        placement = build_placement(ModelArguments(model_name_or_path=args.model), state, backend=args.backend,
                                    ds_config=args.ds_config, micro_batch=args.batch, backprop=bp_args,
                                    learning_rate=1e-5)
        vocab = placement.module.config.vocab_size
        g = torch.Generator().manual_seed(0)
        world = state.world_size
        ids = torch.randint(4, vocab, (args.batch * world, args.seq), generator=g)
        ids = ids[state.rank * args.batch:(state.rank + 1) * args.batch]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        weight = float(ids[:, 1:].numel())

        def closure():
            return causal_lm_loss(placement, batch)

        if backprop:
            from mezo_dist.backprop import Backprop

            trainer = Backprop(placement, bp_args, lr=lambda s: 1e-5)

            def step():
                trainer.step([MicroBatch(loss=closure, weight=weight)])
        else:
            zo = MeZO(placement, lr=1e-6, eps=1e-3, seed=1)

            def step():
                zo.step(closure)

        step()  # warm-up: lazy initialisation, DeepSpeed's first trace, optimizer state
        log: list[dict] = []
        record_collectives(log)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                step()
        elapsed = time.perf_counter() - t0
        gloo = Counter(e.name for e in prof.events() if e.name.startswith("gloo:"))
        events = gloo_events(prof)
        param = next(placement.module.parameters())
        mesh = param.device_mesh.mesh.tolist() if hasattr(param, "device_mesh") else None
        report = {"rank": state.rank, "world_size": world, "collectives": log, "profiler_gloo_ops": dict(gloo), "gloo_events": events,
                  "mesh": mesh, "seconds": elapsed}
        Path(f"{args.out}.rank{state.rank}").write_text(json.dumps(report))
    finally:
        teardown()


def zero3_configs(tmp: Path) -> dict[str, Path]:
    """The shipped ZeRO-3 configs; AdamW through torch's optimizer (no compiled DeepSpeed op)."""
    return {"mezo": ROOT / "ds_configs" / "zero3.json", "backprop": adamw_torch_config(tmp)}


def summarise(reports: list[dict], steps: int, replicas: int) -> dict:
    """Per-step bytes and calls by kind on rank 0, counted from the profiler's gloo events; the
    bytes crossing replica groups from the log (which knows each call's group)."""
    r0 = reports[0]
    world = r0["world_size"]
    gather_group = world // replicas  # FSDP2/ZeRO-3 gather inside a shard group
    per_kind = {k: {"bytes": 0, "calls": 0} for k in KINDS}
    by_op: Counter = Counter()
    for op, numel, nbytes in r0["gloo_events"]:
        k = kind(op)
        # An all-gather's event holds the local input: the gathered payload is group size times it.
        per_kind[k]["bytes"] += nbytes * gather_group if k == "all_gather" else nbytes
        per_kind[k]["calls"] += 1
        by_op[op] += 1
    out = {k: {"bytes": v["bytes"] / steps, "calls": v["calls"] / steps} for k, v in per_kind.items()}
    summary = {"per_step": out, "total_bytes": sum(v["bytes"] for v in out.values()), "ops": dict(by_op),
               "all_reduce_numels": sorted({n for op, n, _ in r0["gloo_events"] if kind(op) == "all_reduce"}),
               "logged_calls": len(r0["collectives"]), "profiler_gloo_calls": len(r0["gloo_events"]),
               "seconds_per_step": r0["seconds"] / steps}
    if replicas > 1:
        size = world // replicas
        groups = [set(range(g * size, (g + 1) * size)) for g in range(replicas)]
        crossing = [c for c in r0["collectives"] if sum(bool(groups[g] & set(c["ranks"])) for g in range(replicas)) > 1]
        summary["cross_replica_bytes"] = sum(c["bytes"] for c in crossing) / steps
        summary["cross_replica_calls"] = len(crossing) / steps
        summary["cross_replica_ops"] = dict(Counter(c["op"] for c in crossing))
        # The log sees the collectives called through torch.distributed's Python functions; when
        # the profiler saw more, some (the engine's own) escaped it and the figure is a lower bound.
        summary["cross_replica_complete"] = len(r0["collectives"]) == len(r0["gloo_events"])
    return summary


def run_config(args, model: Path, tmp: Path, method: str, backend: str, world: int, replicas: int,
               ds: dict[str, Path]) -> dict:
    out = tmp / f"{method}_{backend}{world}_{replicas}.json"
    cmd = [__file__, "--worker", "--backend", backend, "--method", method, "--model", model, "--out", out,
           "--steps", args.steps, "--batch", args.batch, "--seq", args.seq, "--hsdp_replicas", replicas]
    if backend == "zero3":
        cmd += ["--ds_config", ds[method]]
    run_ranks(cmd, world, timeout=args.timeout, what=f"{method} {backend} x{world}")
    reports = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
    row = {"method": method, "backend": backend, "world_size": world, "hsdp_replicas": replicas,
           "steps": args.steps}
    row.update(summarise(reports, args.steps, replicas))
    return row


def fmt_bytes(b: float) -> str:
    if b >= 2**20:
        return f"{b / 2**20:.1f} MiB"
    if b >= 2**10:
        return f"{b / 2**10:.1f} KiB"
    return f"{b:.0f} B"


def label(r: dict) -> str:
    if r["hsdp_replicas"] > 1:
        return f"fsdp HSDP {r['hsdp_replicas']}x{r['world_size'] // r['hsdp_replicas']}"
    return f"{r['backend']} x{r['world_size']}"


def add_ratios(rows: list[dict], param_bytes: int) -> None:
    by = {(r["method"], label(r)): r for r in rows}
    for r in rows:
        r["all_gather_over_model"] = r["per_step"]["all_gather"]["bytes"] / param_bytes
        other = by.get(("backprop", label(r)))
        if r["method"] == "mezo" and other is not None and r["total_bytes"]:
            r["backprop_over_mezo"] = other["total_bytes"] / r["total_bytes"]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Bytes per training step: {meta['model']}, micro-batch {meta['micro_batch']} x {meta['seq']} tokens per rank",
        "",
        f"Machine: {meta['machine']}. Rank 0's collectives over {meta['steps']} steps after one warm-up step, "
        "divided by the steps. A collective's size is its full payload (gathered output, unreduced input, "
        f"all-reduced tensor). Model: {fmt_bytes(meta['param_bytes'])} of fp32 parameters; "
        "\"gathers / model\" is all-gathered bytes over that.",
        "",
        "| trainer | placement | all-gathered | reduce-scattered | all-reduced | other | total | gathers / model | calls (gather / scatter / reduce / other) | backprop / MeZO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ps = r["per_step"]
        calls = " / ".join(f"{ps[k]['calls']:g}" for k in KINDS)
        ratio = f"{r['backprop_over_mezo']:.2f}x" if "backprop_over_mezo" in r else "-"
        lines.append(f"| {r['method']} | {label(r)} | {fmt_bytes(ps['all_gather']['bytes'])} | "
                     f"{fmt_bytes(ps['reduce_scatter']['bytes'])} | {fmt_bytes(ps['all_reduce']['bytes'])} | "
                     f"{fmt_bytes(ps['other']['bytes'])} | {fmt_bytes(r['total_bytes'])} | "
                     f"{r['all_gather_over_model']:.2f} | {calls} | {ratio} |")
    hsdp = [r for r in rows if r["hsdp_replicas"] > 1]
    if hsdp:
        lines += ["", "Across replica groups (HSDP, collectives whose group spans more than one replica group):", "",
                  "| trainer | placement | bytes per step | calls per step | ops |", "|---|---|---|---|---|"]
        for r in hsdp:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["cross_replica_ops"].items())) or "none"
            lower = "" if r.get("cross_replica_complete", True) else " (at least)"
            lines.append(f"| {r['method']} | {label(r)} | {fmt_bytes(r['cross_replica_bytes'])}{lower} | "
                         f"{r['cross_replica_calls']:g} | {ops} |")
    lines += ["", "Counted from the profiler's gloo events (every collective that reached gloo, with its tensor's "
              "shape and dtype). gloo has no reduce-scatter: FSDP2 and DeepSpeed reduce gradients with all-reduces "
              "of the unsharded gradient on this backend, so the backprop gradient traffic is in the all-reduced "
              "column here; NCCL would run reduce-scatters of the same payload."]
    if hsdp:
        lines += ["", "Cross-replica figures come from the Python-level log of torch.distributed calls, which knows "
                  "each call's group; \"at least\" marks rows where the profiler saw collectives the log did not "
                  "(the engine's gradient reductions)."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path, meta: dict) -> bool:
    plt = pyplot("comm_volume")
    if plt is None:
        return False
    names = [f"{r['method']}\n{label(r)}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    bottom = [0.0] * len(rows)
    for k in KINDS:
        vals = [r["per_step"][k]["bytes"] / 2**20 for r in rows]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=k.replace("_", "-"))
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("MiB per step (rank 0)")
    ax.set_title(f"Collective bytes per step, {meta['model']}", fontsize=10)
    ax.legend()
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, timeout=600, model_shape=(512, 8, 2048))
    p.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=1, help="recorded steps (after one warm-up step); bytes per step do not vary")
    p.add_argument("--methods", default="mezo,backprop")
    p.add_argument("--placements", default="fsdp,zero3", help="2-rank placements: fsdp, zero3")
    p.add_argument("--hsdp", action="store_true", help="also FSDP2 on a 2 x 2 HSDP mesh (4 ranks)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--ds_config", help=argparse.SUPPRESS)
    p.add_argument("--hsdp_replicas", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    methods = [m for m in args.methods.split(",") if m]
    plan = [(b, 2, 1) for b in args.placements.split(",") if b]
    if args.hsdp:
        plan.append(("fsdp", 4, 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, cfg, n_params = random_opt(tmp / "model", args)
        ds = zero3_configs(tmp)
        for backend, world, replicas in plan:
            for method in methods:
                row = run_config(args, model, tmp, method, backend, world, replicas, ds)
                rows.append(row)
                ps = row["per_step"]
                print(f"{method:>8} {label(row):>14}: gather {fmt_bytes(ps['all_gather']['bytes'])}  "
                      f"scatter {fmt_bytes(ps['reduce_scatter']['bytes'])}  reduce {fmt_bytes(ps['all_reduce']['bytes'])}  "
                      f"other {fmt_bytes(ps['other']['bytes'])}"
                      + (f"  cross-replica {fmt_bytes(row['cross_replica_bytes'])}" if replicas > 1 else ""), flush=True)
    param_bytes = n_params * 4
    add_ratios(rows, param_bytes)
    meta = {"model": describe_opt(cfg, n_params),
            "parameters": n_params, "param_bytes": param_bytes, "micro_batch": args.batch, "seq": args.seq,
            "steps": args.steps, "machine": machine(comm="gloo")}
    write_results(args.results, "comm_volume", meta, rows, markdown(rows, meta), lambda rows, path: chart(rows, path, meta))


if __name__ == "__main__":
    main()
