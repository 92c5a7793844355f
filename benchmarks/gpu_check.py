"""The GPU figures the CPU cannot give: step cost, perturbation bandwidth and memory on one GPU.

For random-weight OPT-1.3B and OPT-6.7B in bf16 (built on the device from their published
dimensions, no download), on one GPU:

* the time of one inference forward and of one MeZO step, and their ratio (a MeZO step is two
  forwards plus three passes over the parameters: the ratio says what the passes cost);
* the time of one perturbation pass per kernel (``--zo_kernel`` choices available there), and
  its bandwidth as a fraction of what a device-to-device copy reaches on the same GPU (a pass
  reads and writes every parameter once, so a copy is its ceiling);
* the peak memory of a MeZO step (the allocator's) against the capacity planner's prediction
  for the same setting (``python -m mezo_dist.plan``).

    python benchmarks/gpu_check.py                 # results/gpu/gpu_check.{json,md,png}
    python benchmarks/gpu_check.py --dry-run       # the same code on CPU with a tiny OPT (CI)

``benchmarks/gpu_check.sh`` runs this after the CUDA-only tests (``pytest -m gpu``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import machine, pyplot, sync, timed, write_results  # noqa: E402

# A stand-in for the OPT sizes in --dry-run: small enough for a CPU in CI, same code path.
TINY = (64, 2, 128, 512, 4)


def opt_config(dims: tuple[int, int, int, int, int]):
    from transformers import OPTConfig

    hidden, layers, ffn, vocab, heads = dims
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn, vocab_size=vocab,
                     num_attention_heads=heads, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                     do_layer_norm_before=True)


def opt_model(dims: tuple[int, int, int, int, int], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight OPT built directly in ``dtype`` on ``device`` (no fp32 copy on the host)."""
    from transformers import OPTForCausalLM

    config = opt_config(dims)
    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def copy_bandwidth(device: torch.device, numel: int, iters: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, iters)
    return 2 * numel * src.element_size() / t


def peak_bytes(fn, device: torch.device) -> int:
    if device.type != "cuda":
        from mezo_dist.metrics import peak_memory_bytes, reset_peak_memory

        reset_peak_memory(device)
        fn()
        return peak_memory_bytes(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def kernels_here(device: torch.device) -> list[str]:
    """The --zo_kernel choices that run on ``device`` (``auto`` first: what a run gets)."""
    from mezo_dist.zo import passes

    out = []
    for k in passes.KERNELS:
        try:
            passes.resolve_kernel(k, device)
        except ValueError:
            continue
        out.append(k)
    return out


def measure(name: str, dims, shape, args: argparse.Namespace, device: torch.device) -> dict:
    from mezo_dist import plan
    from mezo_dist.distributed import DistState
    from mezo_dist.objectives import causal_lm_loss
    from mezo_dist.placement.single import SinglePlacement
    from mezo_dist.zo.step import MeZO

    dtype = torch.bfloat16
    model = opt_model(dims, device, dtype)
    state = DistState(rank=0, world_size=1, local_rank=0, device=device, backend="")
    placement = SinglePlacement(model, state)
    placement.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dims[3], (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    elements = sum(p.local.numel() for p in placement.pieces())

    def closure():
        return causal_lm_loss(placement, batch)

    with torch.no_grad():
        fwd = timed(closure, device, args.iters)
    row: dict = {"model": name, "parameters": elements, "dtype": "bf16", "batch": args.batch, "seq_len": args.seq,
                 "forward_s": fwd, "kernels": {}}
    for kernel in kernels_here(device):
        zo = MeZO(placement, lr=1e-9, eps=1e-3, seed=0, kernel=kernel)
        step = timed(lambda: zo.step(closure), device, args.iters)
        perturb = timed(lambda: zo.perturb(12345, 0.0), device, args.iters)
        pass_bw = 2 * elements * 2 / perturb  # bf16: 2 bytes read and 2 written per element
        row["kernels"][kernel] = {"stream": zo.noise_stream, "step_s": step, "step_over_two_forwards": step / (2 * fwd),
                                  "perturb_pass_s": perturb, "pass_bytes_per_s": pass_bw,
                                  "pass_over_copy_bandwidth": pass_bw / args.copy_bw}
    zo = MeZO(placement, lr=1e-9, eps=1e-3, seed=0)
    row["peak_step_bytes"] = peak_bytes(lambda: zo.step(closure), device)
    setting = plan.Setting(gpus=1, seq_len=args.seq, batch_size=args.batch, dtype="bf16")
    predicted = plan.estimate(shape, "mezo", "single", setting)
    row["planner_bytes"] = predicted.total
    row["measured_over_planner"] = row["peak_step_bytes"] / predicted.total
    del placement, model, zo
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# GPU check: {meta['device']}", "",
             f"{meta['machine']}; copy bandwidth {meta['copy_bandwidth_gb_s']:.0f} GB/s (read + write); "
             f"micro-batch {meta['batch']} x {meta['seq_len']} tokens, bf16, medians of {meta['iters']} runs"
             + (" (dry run: tiny OPT on CPU, figures mean nothing)" if meta["dry_run"] else "") + ".", "",
             "| model | kernel (stream) | forward (s) | MeZO step (s) | step / 2 fwd | pass (ms) | pass / copy bandwidth |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for k, v in r["kernels"].items():
            lines.append(f"| {r['model']} | {k} ({v['stream']}) | {r['forward_s']:.4f} | {v['step_s']:.4f} | "
                         f"{v['step_over_two_forwards']:.3f}x | {1e3 * v['perturb_pass_s']:.2f} | "
                         f"{v['pass_over_copy_bandwidth']:.2f} |")
    lines += ["", "| model | peak step memory (GiB) | planner (GiB) | measured / planner |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['peak_step_bytes'] / 2**30:.2f} | {r['planner_bytes'] / 2**30:.2f} | "
                     f"{r['measured_over_planner']:.3f} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    plt = pyplot("gpu_check")
    if plt is None:
        return
    labels = [f"{r['model']}\n{k}" for r in rows for k in r["kernels"]]
    ratio = [v["step_over_two_forwards"] for r in rows for v in r["kernels"].values()]
    bw = [v["pass_over_copy_bandwidth"] for r in rows for v in r["kernels"].values()]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(labels, ratio)
    a.axhline(1.0, color="gray", lw=0.8)
    a.set_title("MeZO step / two forwards")
    b.bar(labels, bw)
    b.set_ylim(0, 1.05)
    b.set_title("perturbation pass / copy bandwidth")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from mezo_dist import plan

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1.3b,6.7b", help="OPT sizes (mezo_dist.plan.OPT keys)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="tiny OPT on CPU: checks the code path, measures nothing")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = p.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        args.batch, args.seq, args.iters = 2, 16, 1
        models = [("opt-tiny", TINY)]
    else:
        if not torch.cuda.is_available():
            print("gpu_check: error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        models = [(f"opt-{s}", plan.OPT[s]) for s in args.models.split(",")]
    args.copy_bw = copy_bandwidth(device, 1 << 20 if args.dry_run else 1 << 30, args.iters)
    rows = []
    for name, dims in models:
        shape = _tiny_shape(dims) if args.dry_run else plan.opt_shape(name.removeprefix("opt-"))
        row = measure(name, dims, shape, args, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "machine": machine(),
            "copy_bandwidth_gb_s": args.copy_bw / 1e9, "batch": args.batch, "seq_len": args.seq,
            "iters": args.iters, "dry_run": args.dry_run}
    write_results(args.results, "gpu_check", meta, rows, markdown(rows, meta), chart)
    return 0


def _tiny_shape(dims):
    """The planner's shape of the dry run's tiny OPT, counted by the planner from its config."""
    import tempfile

    from mezo_dist import plan

    with tempfile.TemporaryDirectory() as tmp:
        opt_config(dims).save_pretrained(tmp)
        return plan.shape_from_folder(tmp)


if __name__ == "__main__":
    sys.exit(main())
