"""What does a MeZO step cost next to inference?

For one model and global batch, per backend and world size: the time of a MeZO step against two
inference forward passes of the same micro-batch, the time of one pass of perturbation over the
rank's parameters, and peak memory during the steps against peak memory during inference alone.

    python benchmarks/step_cost.py                              # SmolLM2-135M, batch 16 x 32
    python benchmarks/step_cost.py --model_name_or_path facebook/opt-1.3b --batch 16 --seq 256

Each configuration runs in its own processes (``torchrun`` for world size 2). Results go to
``benchmarks/results/step_cost.{json,md,png}``. Memory is the CUDA allocator's peak on GPU and the
resident-set high-water mark on CPU (VmHWM, reset between the inference and the step windows,
measured after the timings with glibc told to return large frees to the system).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, parser, pyplot, run_ranks, save_figure, write_results  # noqa: E402

CONFIGS = [("single", 1), ("fsdp", 1), ("zero3", 1), ("single", 2), ("fsdp", 2), ("zero3", 2)]


def exact_cpu_memory(device) -> None:
    """glibc raises its mmap threshold after large frees and then keeps freed tensors in its heap,
    where the resident set no longer tracks live memory; a fixed threshold keeps it honest."""
    if device.type != "cpu":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except OSError:
        pass


def worker(args: argparse.Namespace) -> None:
    import torch

    from mezo_dist.placement.deepspeed_config import read_ds_config
    from mezo_dist.distributed import init_distributed, teardown
    from mezo_dist.metrics import peak_memory_bytes, reset_peak_memory
    from mezo_dist.models import DTYPES
    from mezo_dist.objectives import causal_lm_loss
    from mezo_dist.zo.step import MeZO

    state = init_distributed(use_deepspeed=args.backend == "zero3", need_group=args.backend == "fsdp")
    try:
        dtype = DTYPES[args.dtype]
        micro = args.batch // state.world_size
        if args.backend == "single":
            from mezo_dist.placement.single import build_single

            placement = build_single(args.model_name_or_path, state, dtype=dtype)
        elif args.backend == "fsdp":
            from mezo_dist.placement.fsdp import build_fsdp

            placement = build_fsdp(args.model_name_or_path, state, dtype=dtype)
        else:
            from mezo_dist.placement.zero3 import build_zero3

            ds = read_ds_config(str(ROOT / "ds_configs" / "zero3.json"))
            placement = build_zero3(args.model_name_or_path, ds, state, micro_batch=micro, dtype=dtype)
        placement.eval()
        vocab = placement.module.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)[state.rank * micro : (state.rank + 1) * micro]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        batch = {k: v.to(state.device) for k, v in batch.items()}

        def closure():
            return causal_lm_loss(placement, batch)

        def sync():
            if state.device.type == "cuda":
                torch.cuda.synchronize()

        def timed(fn, n):
            out = []
            for _ in range(n):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                out.append(time.perf_counter() - t0)
            return statistics.median(out)

        zo = MeZO(placement, lr=1e-7, eps=1e-3, seed=0)
        with torch.no_grad():
            timed(closure, args.warmup)
            fwd = timed(closure, args.iters)
        timed(lambda: zo.step(closure), args.warmup)
        step = timed(lambda: zo.step(closure), args.iters)
        perturb = timed(lambda: zo.perturb(12345, 0.0), args.iters)
        # Memory in windows of its own, after the timings: on CPU the allocator is first told to
        # return large frees to the system, so the resident set tracks live tensors (that mode
        # slows allocation down, so it stays out of the timed runs).
        exact_cpu_memory(state.device)
        with torch.no_grad():
            reset_peak_memory(state.device)
            timed(closure, 2)
        peak_inf = peak_memory_bytes(state.device)
        reset_peak_memory(state.device)
        timed(lambda: zo.step(closure), 2)
        peak_step = peak_memory_bytes(state.device)
        local = sum(p.local.numel() for p in placement.pieces())
        row = {
            "backend": args.backend, "world_size": state.world_size, "device": state.device.type,
            "model": Path(args.model_name_or_path).name, "dtype": args.dtype, "global_batch": args.batch, "seq_len": args.seq,
            "local_elements": local, "forward_s": fwd, "step_s": step, "step_over_two_forwards": step / (2 * fwd),
            "perturb_pass_s": perturb, "peak_inference_bytes": peak_inf, "peak_step_bytes": peak_step,
            "memory_ratio": peak_step / peak_inf,
        }
        rows = [row]
        if state.world_size > 1:
            import torch.distributed as dist

            rows = [None] * state.world_size
            dist.all_gather_object(rows, row)
        if state.is_main:
            Path(args.out).write_text(json.dumps(rows))
    finally:
        teardown()


def launch(args: argparse.Namespace, backend: str, world: int, out: Path) -> list[dict]:
    run_ranks([__file__, "--worker", "--backend", backend, "--out", out, "--model_name_or_path", args.model_name_or_path,
               "--batch", args.batch, "--seq", args.seq, "--dtype", args.dtype, "--iters", args.iters,
               "--warmup", args.warmup], world, timeout=None, what=f"{backend} x{world}")
    return json.loads(out.read_text())


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# MeZO step cost: {meta['model']}, global batch {meta['global_batch']} x {meta['seq_len']} tokens, {meta['dtype']}",
        "",
        f"Machine: {meta['machine']}. Medians of {meta['iters']} after {meta['warmup']} warm-up runs; rank 0's figures.",
        "",
        "| backend | world | 2 forwards (s) | MeZO step (s) | step / 2 fwd | perturb pass (s) | peak inference (GiB) | peak step (GiB) | step / inference memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['world_size']} | {2 * r['forward_s']:.3f} | {r['step_s']:.3f} | "
            f"{r['step_over_two_forwards']:.2f}x | {r['perturb_pass_s']:.3f} | {r['peak_inference_bytes'] / 2**30:.2f} | "
            f"{r['peak_step_bytes'] / 2**30:.2f} | {r['memory_ratio']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model_name_or_path", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", default=",".join(f"{b}:{w}" for b, w in CONFIGS),
                   help="comma-separated backend:world pairs")
    p.add_argument("--tag", default="", help="suffix for the result files")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.model_name_or_path == "smollm2-135m":
        from mezo_dist.assets import default_model_dir

        args.model_name_or_path = str(default_model_dir())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.configs.split(","):
            backend, world = item.split(":")
            got = launch(args, backend, int(world), Path(tmp) / f"{backend}{world}.json")
            rows.append(got[0])
            r = got[0]
            print(f"{backend:>6} x{world}: 2 fwd {2 * r['forward_s']:.3f}s  step {r['step_s']:.3f}s  "
                  f"({r['step_over_two_forwards']:.2f}x)  memory {r['memory_ratio']:.3f}x", flush=True)
    meta = {"model": Path(args.model_name_or_path).name, "global_batch": args.batch, "seq_len": args.seq,
            "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup, "machine": machine()}
    name = "step_cost" + (f"_{args.tag}" if args.tag else "")
    write_results(args.results, name, meta, rows, markdown(rows, meta), chart)


def chart(rows: list[dict], path: Path) -> bool:
    """Step time over two forwards, and step memory over inference memory, per configuration."""
    plt = pyplot("step_cost")
    if plt is None:
        return False
    names = [f"{r['backend']} x{r['world_size']}" for r in rows]
    fig, (t, m) = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(rows)), 3.8))
    t.bar(names, [r["step_over_two_forwards"] for r in rows])
    t.axhline(1.0, color="grey", lw=0.8)
    t.set_ylabel("MeZO step / two forwards")
    m.bar(names, [r["memory_ratio"] for r in rows], color="#d62728")
    m.axhline(1.0, color="grey", lw=0.8)
    m.set_ylabel("step / inference peak memory")
    for ax in (t, m):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


if __name__ == "__main__":
    main()
