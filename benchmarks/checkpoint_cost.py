"""What do checkpoint checksums cost? One rank's checkpoint file of SmolLM2-135M's size.

The shard is 134.5M fp32 values (538 MB) in 273 flat chunks of SmolLM2-135M's parameter sizes,
random values, no download. Measured, median of ``--repeats``:

* save, before: what ``checkpoint.save_checkpoint`` did until the checksums: a host copy of every
  chunk, then ``safetensors.torch.save_file`` (which copies each tensor into bytes again);
* save, now: ``checkpoint.write_safetensors``: the chunks streamed to the file one at a time,
  sha256 computed over the bytes as they are written, then fsync;
* load, before: ``safe_open`` and a copy of every chunk into place;
* load, now: the same after ``io.sha256_file`` over the file (what each rank does per file);
* sha256 alone over the same bytes in memory, to attribute the difference.

Peak resident memory above the shard itself is measured for the saves (VmHWM, reset before each).

    python benchmarks/checkpoint_cost.py            # results/checkpoint_cost.{json,md,png}
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import machine, parser, pyplot, save_figure, write_results  # noqa: E402
from benchmarks.perturb import SMOLLM2_135M  # noqa: E402


def shard_sizes() -> list[int]:
    """Element counts of SmolLM2-135M's parameters, from its shapes (tied embedding once)."""
    c = SMOLLM2_135M
    h, ffn, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = [h * h, h * kv, h * kv, h * h, h * ffn, h * ffn, ffn * h, h, h]
    return [c["vocab_size"] * h] + layer * c["num_hidden_layers"] + [h]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(repeats: int, folder: Path) -> list[dict]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mezo_dist.checkpoint import write_safetensors
    from mezo_dist.io import sha256_file
    from mezo_dist.metrics import peak_memory_bytes, reset_peak_memory

    g = torch.Generator().manual_seed(0)
    sizes = shard_sizes()
    flat = torch.randn(sum(sizes), generator=g)
    chunks, offset = {}, 0
    for i, n in enumerate(sizes):
        chunks[f"p{i}|0"] = flat[offset : offset + n]
        offset += n
    nbytes = flat.numel() * 4
    cpu = torch.device("cpu")
    old, new = folder / "before.safetensors", folder / "now.safetensors"

    def save_before():
        save_file({k: v.clone() for k, v in chunks.items()}, str(old), metadata={"format": "x"})

    def save_now():
        write_safetensors(new, chunks, {"format": "x"})

    def load(path, verify):
        def run():
            if verify:
                sha256_file(path)
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k, v in chunks.items():
                    v.copy_(f.get_slice(k)[:])
        return run

    rows = []
    for name, fn in (("save, before (clone + save_file)", save_before), ("save, now (streamed + sha256)", save_now)):
        fn()  # warm the page cache and the allocator
        reset_peak_memory(cpu)
        base = peak_memory_bytes(cpu)
        fn()
        extra = max(0, peak_memory_bytes(cpu) - base)
        rows.append({"what": name, "seconds": timed(fn, repeats), "extra_peak_bytes": extra})
    for name, fn in (("load, before (safe_open + copy)", load(old, False)), ("load, now (sha256 file + safe_open + copy)", load(new, True))):
        fn()
        rows.append({"what": name, "seconds": timed(fn, repeats), "extra_peak_bytes": None})
    data = memoryview(flat.view(torch.uint8).numpy())
    rows.append({"what": "sha256 alone over the shard's bytes", "seconds": timed(lambda: hashlib.sha256(data).digest(), repeats),
                 "extra_peak_bytes": None})
    for r in rows:
        r["bytes"] = nbytes
        r["gb_per_s"] = nbytes / r["seconds"] / 1e9
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Checkpoint checksums: one rank's file of {meta['bytes'] / 1e6:.0f} MB (SmolLM2-135M, fp32)", "",
             f"Measured on: {meta['machine']}; median of {meta['repeats']}.", "",
             "| what | seconds | GB/s | peak memory above the shard (MB) |", "|---|---|---|---|"]
    for r in rows:
        peak = "" if r["extra_peak_bytes"] is None else f"{r['extra_peak_bytes'] / 1e6:.0f}"
        lines.append(f"| {r['what']} | {r['seconds']:.3f} | {r['gb_per_s']:.2f} | {peak} |")
    s_old, s_new, l_old, l_new = (rows[i]["seconds"] for i in range(4))
    lines += ["", f"* Saving with checksums takes {s_new / s_old:.2f}x the time of the previous save; loading with "
              f"verification {l_new / l_old:.2f}x the previous load.",
              f"* The streamed save holds {rows[1]['extra_peak_bytes'] / 1e6:.0f} MB above the shard, the previous "
              f"save {rows[0]['extra_peak_bytes'] / 1e6:.0f} MB (a clone, then bytes)."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> bool:
    plt = pyplot("checkpoint_cost")
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [r["what"].replace(" (", "\n(") for r in rows]
    ax.barh(labels, [r["seconds"] for r in rows], color=["#999999", "#3b75af", "#999999", "#3b75af", "#cc7733"])
    ax.set_xlabel("seconds (lower is better)")
    ax.set_title("One rank's 538 MB checkpoint file, with and without sha256")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return True


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = measure(args.repeats, Path(d))
    meta = {"bytes": rows[0]["bytes"], "repeats": args.repeats, "machine": machine(threads=True)}
    write_results(args.results, "checkpoint_cost", meta, rows, markdown(rows, meta), chart)


if __name__ == "__main__":
    main()
