"""Peak host memory per rank at start-up and at the final export: FSDP2 and ZeRO-3 on 2 and 4 CPU
ranks, and ``single`` (the whole model in one process) for scale, set against the planner.

    python benchmarks/startup_memory.py                   # random-weight OPT, 101M parameters; 2 and 4 ranks
    python benchmarks/startup_memory.py --worlds 2

How each figure is measured: each world size runs this script's worker, under ``torchrun`` (plain
python for ``single``), fresh processes. On every rank, for each backend in turn:

1. a tiny model (hidden 38, 2 layers) goes through the same start-up and export first, so that
   imports, the process group and the engine's own buffers are in place before anything counts;
2. freed memory is handed back (``malloc_trim``; glibc's mmap threshold is pinned at 64 KiB, so a
   freed tensor leaves the resident set at once), the resident set's high-water mark (VmHWM) is
   reset and the resident set (VmRSS) read: the *baseline*, the process and its runtime;
3. the model is placed with the launch path's own code (``build_placement``): the start-up
   peak is VmHWM, and VmRSS then is what the rank keeps (its shard);
4. VmHWM is reset and ``final/`` exported (``export.save_pretrained``): the export peak.

The figures are peaks minus the baseline, per rank: what start-up and export add to the process.
Pages of files read or written are the kernel's page cache, not the process's, and do not count
(the start-up reads with ``preadv``, not a memory map). The model is stored and placed in fp32,
so start-up converts nothing. The planner's figures are ``plan.host_io(..., on_cpu=True)`` without
a runtime term. tests/distributed/test_host_memory.py runs the same measurement and bounds it.

Results: ``benchmarks/results/startup_memory.{json,md,png}`` (the chart needs matplotlib).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import describe_opt, machine, parser, pyplot, random_opt, run_ranks, save_figure, write_results  # noqa: E402

# hidden, layers, ffn of the random OPT: 101M parameters, 405 MB in fp32; a block is 50 MB and
# the largest tensor (fc1, fc2) 16.8 MB, so a shard of 2 or 4 is clearly apart from the whole.
MODEL = (1024, 8, 4096)
SHARDED = ("fsdp", "zero3")
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MiB = 2**20


def _resident() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _place(state, backend: str, folder: str):
    from mezo_dist.config import ModelArguments
    from mezo_dist.placement.build import build_placement

    ds_config = str(ROOT / "ds_configs" / "zero3.json") if backend == "zero3" else None
    return build_placement(ModelArguments(model_name_or_path=folder), state, backend=backend, ds_config=ds_config,
                           micro_batch=1)


def start_and_export(state, backend: str, tiny: str, model: str, out: str) -> dict[str, int]:
    """On this rank: place ``model`` on ``backend`` and export it to ``out/<backend>``, after the
    same run on ``tiny``. Returns bytes: the baseline, the start-up peak, what the rank then holds
    and the export peak (resident set)."""
    import gc

    import torch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from mezo_dist.export import save_pretrained
    from mezo_dist.metrics import peak_memory_bytes, reset_peak_memory

    cpu = torch.device("cpu")
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    for folder, name in ((tiny, f"{backend}-tiny"), (model, backend)):
        gc.collect()
        unset_hf_deepspeed_config()  # a ZeRO-3 run before would make transformers build partitioned
        state.barrier()
        reset_peak_memory(cpu)
        base = _resident()
        placement = _place(state, backend, folder)
        state.barrier()
        start, held = peak_memory_bytes(cpu), _resident()
        reset_peak_memory(cpu)
        save_pretrained(placement, None, Path(out) / name)
        export = peak_memory_bytes(cpu)
        del placement
    gc.collect()
    unset_hf_deepspeed_config()
    return {"base": base, "start_peak": start, "held": held, "export_peak": export}


def worker(args: argparse.Namespace) -> None:
    from mezo_dist.distributed import init_distributed, teardown

    backends = args.backends.split(",")
    state = init_distributed(use_deepspeed="zero3" in backends, need_group="fsdp" in backends)
    try:
        mine = {b: start_and_export(state, b, args.tiny, args.model, args.exports) for b in backends}
        every = state.all_gather_object(mine)
        if state.is_main:
            Path(args.out).write_text(json.dumps(every))
    finally:
        teardown()


def measure(world: int, backends: list[str], tiny: Path, model: Path, out: Path, *, timeout: float
            ) -> dict[str, list[dict[str, int]]]:
    """Run the worker on ``world`` fresh ranks for ``backends`` in turn (exports under
    ``out/<backend>``): {backend: [per-rank figures of :func:`start_and_export`]}."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [__file__, "--worker", "--backends", ",".join(backends), "--tiny", str(tiny), "--model", str(model),
           "--exports", str(out), "--out", str(out / "ranks.json")]
    run_ranks(cmd, world, timeout=timeout, what=f"{','.join(backends)} x{world}")
    ranks = json.loads((out / "ranks.json").read_text())
    return {b: [r[b] for r in ranks] for b in backends}


def planned(model: Path, backend: str, world: int) -> dict[str, int]:
    """The planner's figures for CPU ranks, without a runtime (start-up, export), and the sizes
    they are made of: the rank's shard, its piece of the largest tensor, a block, the largest
    tensor and the whole model."""
    from mezo_dist import plan

    shape = plan.resolve_model(str(model))
    s = plan.Setting(gpus=world, seq_len=1, batch_size=1, dtype="fp32")
    h = plan.host_io(shape, backend, s, on_cpu=True)
    n = plan.shard_group(backend, s)
    return {"startup": h.startup, "export": h.export, "shard": plan.local_numel(shape, backend, n) * 4,
            "piece": plan.largest_piece(shape, backend, n) * 4, "block": shape.block_params * 4,
            "largest": shape.largest_param * 4, "whole": shape.params * 4}


def rows_of(world: int, figures: dict[str, list[dict[str, int]]], model: Path) -> list[dict]:
    """One row per backend: the largest rank's figures (model part), the planner's, and ratios to
    the whole model."""
    rows = []
    for backend, ranks in figures.items():
        p = planned(model, backend, world)
        start = max(r["start_peak"] - r["base"] for r in ranks)
        export = max(r["export_peak"] - r["base"] for r in ranks)
        rows.append({"backend": backend, "world": world, "per_rank": ranks, "start_up": start, "export": export,
                     "held": max(r["held"] - r["base"] for r in ranks), "planned": p,
                     "start_up_over_model": start / p["whole"], "export_over_model": export / p["whole"]})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Host memory per rank at start-up and export: {meta['model_desc']}, fp32 ({meta['whole_mib']:.0f} MiB)",
        "",
        f"Machine: {meta['machine']}; measured {meta['date']}, all rows in one run.",
        "Figures: resident-set peak minus the rank's own baseline (the process after the same start-up and export "
        "of a tiny model), MiB, the largest rank; ratio = that figure over the whole model's bytes. Planner: "
        "`plan.host_io(on_cpu=True)` without a runtime term: at start-up the shard plus the largest tensor's "
        "piece (a conversion buffer, not needed here), under ZeRO-3 plus the largest tensor (`zero.Init` makes "
        "each parameter whole before partitioning it); at export the shard plus twice the largest tensor. "
        "`single` maps the file at start-up (`from_pretrained`), whose pages count once read: its export reads "
        "them all and copies the state dict beside them.",
        "",
        "| backend | ranks | shard (planner) | held after start-up | start-up peak | start-up / model | planner start-up "
        "| export peak | export / model | planner export |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["planned"]
        lines.append(f"| {r['backend']} | {r['world']} | {p['shard'] / MiB:.0f} | {r['held'] / MiB:.0f} | "
                     f"{r['start_up'] / MiB:.0f} | {r['start_up_over_model']:.2f}x | {p['startup'] / MiB:.0f} | "
                     f"{r['export'] / MiB:.0f} | {r['export_over_model']:.2f}x | {p['export'] / MiB:.0f} |")
    lines += ["", f"One block of this model is {meta['block_mib']:.0f} MiB, its largest tensor {meta['largest_mib']:.1f} "
              "MiB. Before per-rank start-up and export (issue 16, a 190M-parameter OPT, 2 ranks, peak of the "
              "largest process over a tiny model's run): FSDP2 +1,060 MB (1.6x the model), ZeRO-3 +1,355 MB (2.0x), "
              "where a shard was 339 MB."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path, meta: dict) -> None:
    plt = pyplot("startup_memory.py")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['backend']}\nx{r['world']}" for r in rows]
    xs = range(len(rows))
    series = ((-0.2, "start_up", "startup", "start-up", "#1f77b4"), (0.2, "export", "export", "export", "#d62728"))
    for dx, key, plan_key, name, color in series:
        ax.bar([x + dx for x in xs], [r[key] / MiB for r in rows], width=0.4, color=color, label=f"{name} (measured)")
        ax.scatter([x + dx for x in xs], [r["planned"][plan_key] / MiB for r in rows], color="black", marker="_",
                   s=300, zorder=3, label="planner" if dx < 0 else None)
    ax.axhline(meta["whole_mib"], color="gray", linestyle="--", label="whole model")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("peak per rank minus baseline (MiB)")
    ax.set_title(meta["model_desc"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = parser(__doc__, timeout=1200, model_shape=MODEL)
    p.add_argument("--worlds", default="2,4", help="rank counts for fsdp and zero3")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--backends", "--tiny", "--model", "--exports", "--out"):  # the worker's
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from mezo_dist.testing import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="mezo_startup_memory_") as tmp:
        tmp = Path(tmp)
        model, cfg, n_params = random_opt(tmp / "model", args)
        tiny = make_tiny_model(tmp / "tiny", "opt")
        runs = [(1, ["single"])] + [(int(w), list(SHARDED)) for w in args.worlds.split(",")]
        rows = []
        for world, backends in runs:
            got = rows_of(world, measure(world, backends, tiny, model, tmp / f"x{world}", timeout=args.timeout), model)
            for r in got:
                print(f"{r['backend']} x{world}: start-up +{r['start_up'] / MiB:.0f} MiB, export +{r['export'] / MiB:.0f} "
                      "MiB (largest rank)", flush=True)
            rows += got
    p0 = rows[0]["planned"]
    meta = {"model_desc": describe_opt(cfg, n_params), "parameters": n_params, "machine": machine(comm="gloo"),
            "date": datetime.date.today().isoformat(), "whole_mib": p0["whole"] / MiB, "block_mib": p0["block"] / MiB,
            "largest_mib": p0["largest"] / MiB}
    write_results(args.results, "startup_memory", meta, rows, markdown(rows, meta), lambda r, path: chart(r, path, meta))


if __name__ == "__main__":
    main()
