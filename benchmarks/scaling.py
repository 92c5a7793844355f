"""Weak scaling: training throughput at 1, 2 and 4 ranks, MeZO against the backprop baseline.

Every rank keeps the same micro-batch, so the global batch grows with the world size (weak
scaling). Each configuration runs the real entry point, ``launch/train.py``, as a subprocess
(``torchrun`` above one rank, CPU ranks over gloo, ``OMP_NUM_THREADS = max(1, cores // ranks)``)
on a random-weight OPT of a few tens of millions of parameters and real sentences (SST-2's
training sentences, joined so that every example fills ``--max_length`` tokens).

Throughput comes from the run's own step times, the TensorBoard scalars ``perf/step_time_s`` and
``perf/tokens_per_s`` that rank 0 logs every step; the first step (warm-up: first allocations,
DeepSpeed/FSDP lazy initialisation) is left out and the median of the rest is reported.
examples/s = global batch / step time; tokens/s = target tokens of the global batch / step time.

    python benchmarks/scaling.py                         # fsdp x1,2,4 and single x1, MeZO and AdamW
    python benchmarks/scaling.py --worlds 1,2 --steps 3  # faster

Results: ``benchmarks/results/scaling.{json,md,png}`` (the chart needs matplotlib). On a machine
with fewer cores than ranks the ranks share cores: that is said in the output, and efficiency
there measures contention, not the method.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import (  # noqa: E402
    TRAINER_FLAG,
    cores,
    describe_opt,
    machine,
    parser,
    pyplot,
    random_opt,
    read_scalars,
    run_ranks,
    save_figure,
    threads_per_rank,
    write_results,
    write_text_data,
)

# Learning rates only keep the runs sane; throughput does not depend on them.
LEARNING_RATE = {"mezo": 1e-6, "backprop": 1e-5}


def throughput(out: Path, micro: int, world: int) -> dict:
    """Median step time and throughput of steps 2..N from the run's TensorBoard scalars."""
    sc = read_scalars(out / "tensorboard")
    times = sorted(sc["perf/step_time_s"])
    tok = dict(sc.get("perf/tokens_per_s", []))
    if len(times) < 2:
        raise RuntimeError(f"{out}: fewer than 2 logged steps")
    kept = times[1:]
    step_s = statistics.median(v for _, v in kept)
    tokens = statistics.median(tok[s] * v for s, v in kept if s in tok)  # tokens of one global batch
    rows = [json.loads(l) for l in (out / "trajectory.jsonl").read_text().splitlines() if l.strip()]
    return {"steps_logged": len(times), "steps_timed": len(kept), "step_times_s": [v for _, v in times],
            "step_s": step_s, "global_batch": micro * world, "tokens_per_step": tokens,
            "examples_per_s": micro * world / step_s, "tokens_per_s": tokens / step_s,
            "losses": [r.get("loss") for r in rows]}


def run_one(args, model: Path, train_file: Path, out: Path, method: str, backend: str, world: int) -> dict:
    cmd = [ROOT / "launch" / "train.py", "--model_name_or_path", model, "--train_file", train_file,
           "--output_dir", out, "--backend", backend, "--trainer", TRAINER_FLAG[method],
           "--learning_rate", LEARNING_RATE[method], "--max_steps", args.steps,
           "--per_device_train_batch_size", args.batch, "--max_length", args.max_length,
           "--logging_steps", "1", "--report_to", "tensorboard", "--seed", "0"]
    wall, _, _ = run_ranks(cmd, world, timeout=args.timeout, what=f"{method} {backend} x{world}")
    row = {"method": method, "backend": backend, "world_size": world, "omp_threads": threads_per_rank(world),
           "oversubscribed": world * threads_per_rank(world) > cores(), "wall_s": wall}
    row.update(throughput(out, args.batch, world))
    return row


def add_ratios(rows: list[dict]) -> None:
    """Speed-up and weak-scaling efficiency against the same method on fsdp x1; MeZO over backprop."""
    base = {r["method"]: r for r in rows if r["backend"] == "fsdp" and r["world_size"] == 1}
    by = {(r["method"], r["backend"], r["world_size"]): r for r in rows}
    for r in rows:
        b = base.get(r["method"])
        if b is not None:
            r["speedup_vs_fsdp1"] = r["examples_per_s"] / b["examples_per_s"]
            r["efficiency"] = r["speedup_vs_fsdp1"] / r["world_size"]
        other = by.get(("backprop", r["backend"], r["world_size"]))
        if r["method"] == "mezo" and other is not None:
            r["mezo_over_backprop"] = r["examples_per_s"] / other["examples_per_s"]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Weak scaling: {meta['model']}, micro-batch {meta['micro_batch']} x {meta['max_length']} tokens per rank, fp32",
        "",
        f"Machine: {meta['machine']}. {meta['steps']} steps per run, the first left out; medians of the rest "
        "(rank 0's `perf/step_time_s`). Speed-up and efficiency are against the same trainer on fsdp x1; "
        "efficiency = speed-up / ranks.",
        "",
    ]
    if meta["oversubscribed_worlds"]:
        lines += [f"**{', '.join(f'{w} ranks' for w in meta['oversubscribed_worlds'])} on {meta['cores']} cores: "
                  "oversubscribed** (more ranks than cores, one thread each). Those rows measure ranks sharing "
                  "cores, not what more devices would give.", ""]
    lines += [
        "| trainer | backend | ranks | threads/rank | step (s) | global batch | examples/s | tokens/s | speed-up | efficiency | MeZO / backprop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = f"{r['speedup_vs_fsdp1']:.2f}x" if "speedup_vs_fsdp1" in r else "-"
        ef = f"{r['efficiency']:.0%}" if "efficiency" in r else "-"
        mb = f"{r['mezo_over_backprop']:.2f}x" if "mezo_over_backprop" in r else "-"
        ranks = f"{r['world_size']}" + (" (oversubscribed)" if r["oversubscribed"] else "")
        lines.append(f"| {r['method']} | {r['backend']} | {ranks} | {r['omp_threads']} | {r['step_s']:.3f} | "
                     f"{r['global_batch']} | {r['examples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {sp} | {ef} | {mb} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path, meta: dict) -> bool:
    plt = pyplot("scaling")
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("mezo", "o"), ("backprop", "s")):
        pts = sorted((r["world_size"], r["tokens_per_s"]) for r in rows if r["method"] == method and r["backend"] == "fsdp")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{method} (fsdp)")
    ax.set_xlabel("ranks")
    ax.set_ylabel("tokens/s")
    ax.set_xticks(sorted({r["world_size"] for r in rows}))
    ax.set_title(f"Weak scaling, {meta['model']} ({meta['cores']} CPU cores)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, timeout=600, model_shape=(512, 8, 2048))
    p.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="steps per run; the first is left out")
    p.add_argument("--worlds", default="1,2,4", help="fsdp world sizes")
    p.add_argument("--methods", default="mezo,backprop")
    p.add_argument("--no_single", action="store_true", help="leave out the single x1 rows")
    args = p.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    worlds = [int(w) for w in args.worlds.split(",") if w]
    plan = [] if args.no_single else [("single", 1)]
    plan += [("fsdp", w) for w in worlds]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, cfg, n_params = random_opt(tmp / "model", args)
        n_examples = args.batch * max(worlds + [1]) * (args.steps + 1)
        train_file = tmp / "train.jsonl"
        # One character is one token for the test tokenizer: every example fills max_length.
        write_text_data(train_file, n_examples, args.max_length + 8)
        for backend, world in plan:
            for method in methods:
                out = tmp / f"{method}_{backend}{world}"
                row = run_one(args, model, train_file, out, method, backend, world)
                rows.append(row)
                print(f"{method:>8} {backend:>6} x{world}: step {row['step_s']:.3f}s  {row['examples_per_s']:.2f} ex/s  "
                      f"{row['tokens_per_s']:.0f} tok/s  (wall {row['wall_s']:.0f}s)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    add_ratios(rows)
    meta = {"model": describe_opt(cfg, n_params),
            "parameters": n_params, "micro_batch": args.batch, "max_length": args.max_length, "steps": args.steps,
            "data": "SST-2 train sentences", "cores": cores(),
            "oversubscribed_worlds": sorted({r["world_size"] for r in rows if r["oversubscribed"]}),
            "machine": machine(comm="gloo")}
    write_results(args.results, "scaling", meta, rows, markdown(rows, meta), lambda rows, path: chart(rows, path, meta))


if __name__ == "__main__":
    main()
