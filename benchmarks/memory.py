"""Peak memory per rank and time per step: inference, MeZO, fine-tuning with AdamW, each with and
without LoRA / prefix tuning, on one model, batch and sequence length (the shape of the MeZO
paper's memory table), at world size 1 and 2.

    python benchmarks/memory.py                        # random-weight OPT, ~32M parameters, batch 8 x 128
    python benchmarks/memory.py --worlds 1 --steps 3   # faster
    python benchmarks/memory.py --zero3                # also mezo and backprop under DeepSpeed ZeRO-3 at world 2

How each figure is measured:

* Training rows run the real entry point, ``launch/train.py``, as a subprocess (``torchrun`` for
  two ranks, one thread per rank), ``--steps`` steps with ``--logging_steps 1``. Each step's peak
  per rank and step time are read back from the run's TensorBoard scalars
  (``memory/peak_gib_rank<r>``, ``perf/step_time_s``). The first step's window also holds model
  loading, and the window after the last step holds the export of ``final/``; both are left out:
  the peak is the largest window of steps 2..N, the time the median of those steps (rank 0).
* Inference rows run this script's own worker in the same way: the placement is built with the
  same code as training (``build_placement``), the same micro-batch is taken from the same data
  pipeline, and ``--steps`` forwards (loss included) run under ``torch.no_grad``, each in its own
  peak window after one warm-up forward.
* Memory is what ``mezo_dist.metrics`` reports: the resident-set high-water mark (VmHWM) on CPU,
  reset at every window; the CUDA allocator's peak on GPU. On CPU that includes the process
  itself (Python, torch, transformers, ...), so each group of rows also has a *baseline*: the same
  runner on a tiny model (hidden 38, 2 layers). "model part" = peak - baseline, the memory that
  the model, its activations, gradients and optimizer states take; the ratios against inference
  are computed on that part (the comparable figure to the paper's GPU memory) and on the total.

At world size 2 every method runs on FSDP2 (prefix tuning included), and with ``--zero3`` mezo and
backprop also run on DeepSpeed ZeRO-3 (backprop through a temporary copy of ``ds_configs/zero3_adamw.json``
with ``"torch_adam": true``, so that DeepSpeed needs no compiled Adam op); ZeRO-3 rows are compared
with FSDP2 inference.

Results: ``benchmarks/results/memory.{json,md,png}`` (the chart needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import (  # noqa: E402
    TRAINER_FLAG, adamw_torch_config, machine, parser, random_opt, read_scalars, run_ranks, save_figure, write_results,
    write_text_data)

# name -> (method, extra flags)
METHODS = {
    "inference": (None, []),
    "mezo": ("mezo", []),
    "mezo+lora": ("mezo", ["--lora"]),
    "mezo+prefix": ("mezo", ["--prefix_tuning"]),
    "backprop": ("backprop", []),
    "backprop+lora": ("backprop", ["--lora"]),
    "backprop+prefix": ("backprop", ["--prefix_tuning"]),
}
LR = {"mezo": "1e-6", "backprop": "1e-5"}
BASE_DIMS = {}  # make_tiny_model's defaults: hidden 38, 2 layers


# ----------------------------------------------------------------------------------------------
# inference worker (runs inside its own process, or under torchrun)


def worker(args: argparse.Namespace) -> None:
    import torch

    from mezo_dist.config import ModelArguments
    from mezo_dist.data import TextBatches, TokenizedText, read_jsonl
    from mezo_dist.distributed import init_distributed, teardown
    from mezo_dist.metrics import peak_memory_bytes, reset_peak_memory
    from mezo_dist.models import load_tokenizer
    from mezo_dist.objectives import causal_lm_loss
    from mezo_dist.placement.build import build_placement

    state = init_distributed(need_group=args.backend == "fsdp")
    try:
        placement = build_placement(ModelArguments(model_name_or_path=args.model), state, backend=args.backend,
                                    ds_config=None, micro_batch=args.batch)
        placement.eval()
        tok = load_tokenizer(args.model)
        data = TokenizedText.build(read_jsonl(args.train_file), tok, args.max_length)
        batches = TextBatches(data, micro_batch=args.batch, rank=state.rank, world_size=state.world_size, seed=0)
        batch = {k: v.to(state.device) for k, v in batches.batch(0)[0].items()}
        peaks, times = [], []
        with torch.no_grad():
            causal_lm_loss(placement, batch)  # warm-up
            for _ in range(args.steps):
                reset_peak_memory(state.device)
                t0 = time.perf_counter()
                causal_lm_loss(placement, batch)
                if state.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                peaks.append(peak_memory_bytes(state.device))
        mine = {"peak": max(peaks), "time": statistics.median(times), "shape": list(batch["input_ids"].shape)}
        rows = [mine]
        if state.world_size > 1:
            import torch.distributed as dist

            rows = [None] * state.world_size
            dist.all_gather_object(rows, mine)
        if state.is_main:
            Path(args.out).write_text(json.dumps(rows))
    finally:
        teardown()


# ----------------------------------------------------------------------------------------------
# driver


def measure_train(args, model: Path, train_file: Path, out: Path, method: str, flags: list[str], backend: str,
                  world: int, ds_config: Path | None) -> dict:
    cmd = ["launch/train.py", "--model_name_or_path", str(model), "--train_file", str(train_file),
           "--max_length", str(args.max_length), "--per_device_train_batch_size", str(args.batch),
           "--max_steps", str(args.steps), "--logging_steps", "1", "--report_to", "tensorboard",
           "--disable_tqdm", "--output_dir", str(out), "--overwrite_output_dir", "--trainer", TRAINER_FLAG[method],
           "--learning_rate", LR[method], *flags]
    if ds_config is not None:
        cmd += ["--ds_config", str(ds_config)]
    else:
        cmd += ["--backend", backend]
    wall, _, _ = run_ranks(cmd, world, timeout=args.timeout, what=f"{method} {backend} x{world}")
    sc = read_scalars(out / "tensorboard")
    # Windows: logger.memory(step) after step index `step`; skip index 0 (it also holds loading) and
    # the final window (export), which train.py logs at step index max_steps.
    steps = range(1, args.steps)
    peaks = []
    for r in range(world):
        got = dict(sc[f"memory/peak_gib_rank{r}"])
        peaks.append(max(got[s] for s in steps) * 2**30)
    times = dict(sc["perf/step_time_s"])
    first = dict(sc[f"memory/peak_gib_rank0"])[0] * 2**30
    return {"peak_per_rank": peaks, "step_s": statistics.median(times[s] for s in steps), "first_step_s": times[0],
            "peak_first_window_rank0": first, "wall_s": wall, "method": "launch/train.py (TensorBoard scalars)"}


def measure_infer(args, model: Path, train_file: Path, out: Path, backend: str, world: int) -> dict:
    res = out / "infer.json"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [__file__, "--worker", "--backend", backend, "--model", str(model), "--train_file", str(train_file),
           "--max_length", str(args.max_length), "--batch", str(args.batch), "--steps", str(args.steps),
           "--out", str(res)]
    wall, _, _ = run_ranks(cmd, world, timeout=args.timeout, what=f"inference {backend} x{world}")
    rows = json.loads(res.read_text())
    return {"peak_per_rank": [r["peak"] for r in rows], "step_s": rows[0]["time"], "shape": rows[0]["shape"],
            "wall_s": wall, "method": "in-process forward under no_grad (benchmarks/memory.py worker)"}


def plan(args) -> list[dict]:
    """(group, method, backend, world, ds_config kind) for every cell."""
    cells = []
    methods = [m for m in METHODS if m in args.methods.split(",")]
    for world in [int(w) for w in args.worlds.split(",")]:
        sharded = "single" if world == 1 else "fsdp"
        for m in methods:
            cells.append({"world": world, "name": m, "backend": sharded, "zero3": False})
        if world > 1 and args.zero3:
            for m in ("mezo", "backprop"):
                if m in methods:
                    cells.append({"world": world, "name": m, "backend": "zero3", "zero3": True})
    return cells


def zero3_configs(tmp: Path) -> dict[str, Path]:
    return {"mezo": ROOT / "ds_configs" / "zero3.json", "backprop": adamw_torch_config(tmp)}


def fmt_gib(b: float) -> str:
    return f"{b / 2**30:.3f}"


def summarise(cells: list[dict], baselines: dict) -> None:
    """Model part (peak - baseline) and ratios vs the inference row of the same world size and
    backend (ZeRO-3 rows: FSDP2 inference)."""
    for c in cells:
        if "error" in c:
            continue
        kind = "infer" if c["name"] == "inference" else "train"
        base = baselines.get((kind, c["backend"], c["world"]))
        c["baseline_per_rank"] = base["peak_per_rank"] if base else None
        c["peak_max"] = max(c["peak_per_rank"])
        c["model_part_max"] = max(p - b for p, b in zip(c["peak_per_rank"], base["peak_per_rank"])) if base else None
    infer = {(c["world"], c["backend"]): c for c in cells if c["name"] == "inference" and "error" not in c}
    for c in cells:
        if "error" in c:
            continue
        ref_backend = c["backend"] if c["backend"] != "zero3" else "fsdp"
        ref = infer.get((c["world"], ref_backend))
        c["inference_ref"] = f"inference {ref_backend} x{c['world']}" if ref else None
        if ref:
            c["ratio_total"] = c["peak_max"] / ref["peak_max"]
            c["step_over_forward"] = c["step_s"] / ref["step_s"]
            if c["model_part_max"] is not None and ref["model_part_max"]:
                c["ratio_model_part"] = c["model_part_max"] / ref["model_part_max"]


def label(c: dict) -> str:
    return f"{c['name']} ({c['backend']} x{c['world']})"


def markdown(cells: list[dict], baselines: dict, meta: dict) -> str:
    lines = [
        f"# Peak memory and step time: {meta['model_desc']}, micro-batch {meta['batch']} x {meta['max_length']} tokens per rank, fp32",
        "",
        f"Machine: {meta['machine']}; measured {meta['date']}. The CPU was shared with other jobs: times are indicative.",
        f"{meta['steps']} steps per run; peak = largest per-step window of steps 2..{meta['steps']} "
        "(resident-set high-water mark per rank on CPU), time = median of those steps on rank 0.",
        "Model part = peak - baseline (the same runner on a hidden-38, 2-layer model: the process itself).",
        "Ratios: against inference at the same world size and backend (ZeRO-3 rows: FSDP2 inference).",
        "",
        "| method | backend | world | peak / rank (GiB) | baseline (GiB) | model part (GiB) | vs inference (model part) | vs inference (total) | time / step (s) | step / forward | measured by |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        if "error" in c:
            lines.append(f"| {c['name']} | {c['backend']} | {c['world']} | {c['error']} | | | | | | | |")
            continue
        peaks = " / ".join(fmt_gib(p) for p in c["peak_per_rank"])
        base = " / ".join(fmt_gib(p) for p in c["baseline_per_rank"]) if c.get("baseline_per_rank") else "-"
        part = fmt_gib(c["model_part_max"]) if c.get("model_part_max") is not None else "-"
        rm = f"{c['ratio_model_part']:.2f}x" if "ratio_model_part" in c else "-"
        rt = f"{c['ratio_total']:.2f}x" if "ratio_total" in c else "-"
        how = "forward, no_grad (worker)" if c["name"] == "inference" else "launch/train.py"
        sf = f"{c['step_over_forward']:.2f}x" if "step_over_forward" in c else "-"
        lines.append(f"| {c['name']} | {c['backend']} | {c['world']} | {peaks} | {base} | {part} | {rm} | {rt} | "
                     f"{c['step_s']:.2f} | {sf} | {how} |")
    for note in meta.get("notes", []):
        lines += ["", note]
    lines += ["", "Peak and baseline list rank 0 / rank 1 at world size 2; model part and ratios use the larger rank.",
              "Inference time is one forward; MeZO's step makes two forwards and three perturbation passes; "
              "backprop's step a forward, a backward and an AdamW update."]
    return "\n".join(lines) + "\n"


def chart(cells: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in cells if "error" not in c and c.get("model_part_max") is not None]
    worlds = sorted({c["world"] for c in ok})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.5), squeeze=False)
    colors = {"inference": "#777777", "mezo": "#1f77b4", "backprop": "#d62728"}
    for ax, w in zip(axes[0], worlds):
        rows = [c for c in ok if c["world"] == w]
        names = [f"{c['name']}\n{c['backend']}" for c in rows]
        vals = [c["model_part_max"] / 2**20 for c in rows]
        cols = [colors[c["name"].split("+")[0]] for c in rows]
        bars = ax.bar(range(len(rows)), vals, color=cols)
        for b, c in zip(bars, rows):
            r = c.get("ratio_model_part")
            if r is not None:
                ax.annotate(f"{r:.1f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("peak per rank minus process baseline (MiB)")
        ax.set_title(f"world size {w}")
    fig.suptitle(f"{meta['model_desc']}, {meta['batch']} x {meta['max_length']} tokens per rank "
                 "(labels: x inference)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    p = parser(__doc__, timeout=600, model_shape=(512, 10, 2048))
    p.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="training steps (or forwards) per run; the first is left out")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--zero3", action="store_true", help="also mezo and backprop under DeepSpeed ZeRO-3 at world size > 1")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--train_file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is left out)")

    from mezo_dist.testing import make_tiny_model

    cells = plan(args)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mezo_memory_") as tmp:
        tmp = Path(tmp)
        model, _, n_params = random_opt(tmp / "model", args)
        base_model = make_tiny_model(tmp / "base", "opt", **BASE_DIMS)
        train_file = tmp / "train.jsonl"
        write_text_data(train_file, n=max(64, 2 * args.batch * args.steps * 2), min_chars=2 * args.max_length)
        ds = zero3_configs(tmp) if args.zero3 else {}

        def measure(c: dict, mdl: Path, out: Path) -> dict:
            if c["name"] == "inference":
                return measure_infer(args, mdl, train_file, out, c["backend"], c["world"])
            method, flags = METHODS[c["name"]]
            return measure_train(args, mdl, train_file, out, method, flags, c["backend"], c["world"],
                                 ds[method] if c["backend"] == "zero3" else None)

        # Baselines: each runner (inference worker / train.py) per backend and world size, tiny model.
        baselines = {}
        keys = sorted({("infer" if c["name"] == "inference" else "train", c["backend"], c["world"]) for c in cells})
        for kind, backend, world in keys:
            c = {"name": "inference" if kind == "infer" else "mezo", "backend": backend, "world": world}
            try:
                baselines[(kind, backend, world)] = measure(c, base_model, tmp / f"base-{kind}-{backend}{world}")
            except RuntimeError as e:
                print(f"baseline {kind} {backend} x{world} failed: {str(e)[-600:]}", flush=True)
                continue
            b = baselines[(kind, backend, world)]
            print(f"baseline {kind:>5} {backend:>6} x{world}: {' / '.join(fmt_gib(x) for x in b['peak_per_rank'])} GiB"
                  f"  ({b['wall_s']:.0f} s)", flush=True)
        for i, c in enumerate(cells):
            try:
                c.update(measure(c, model, tmp / f"run{i}"))
            except RuntimeError as e:
                c["error"] = "failed"
                c["detail"] = str(e)[-1500:]
                print(f"{label(c)} failed: {str(e)[-1500:]}", flush=True)
                continue
            print(f"{label(c):>28}: peak {' / '.join(fmt_gib(x) for x in c['peak_per_rank'])} GiB  "
                  f"{c['step_s']:.2f} s/step  ({c['wall_s']:.0f} s)", flush=True)

    summarise(cells, baselines)
    order = {m: i for i, m in enumerate(METHODS)}
    cells.sort(key=lambda c: (c["world"], c["backend"] == "zero3", order[c["name"]], c["backend"]))
    meta = {
        "model_desc": f"random-weight OPT ({args.hidden} hidden, {args.layers} layers, ffn {args.ffn}, "
                      f"char tokenizer), {n_params / 1e6:.1f}M parameters",
        "parameters": n_params, "hidden": args.hidden, "layers": args.layers, "ffn": args.ffn,
        "batch": args.batch, "max_length": args.max_length, "steps": args.steps,
        "machine": machine(comm="gloo"),
        "date": datetime.date.today().isoformat(),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "notes": [],
    }
    baseline_rows = [{"runner": k[0], "backend": k[1], "world": k[2], **v} for k, v in baselines.items()]
    write_results(args.results, "memory", meta, cells, markdown(cells, baselines, meta),
                  lambda rows, path: chart(rows, path, meta), extra={"baselines": baseline_rows})


if __name__ == "__main__":
    main()
