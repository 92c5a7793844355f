"""How fast is one perturbation pass over a 135M-parameter model?

Elements per second of ``theta += eps z`` over every parameter of SmolLM2-135M's shapes (random
weights, built from its config: no download), for:

* ``reference``: the MeZO reference's way, per parameter ``torch.normal(0, 1, p.shape)`` from the
  global generator, then out of place ``p.data = p.data + eps * z``;
* ``compiled``: this project's default pass (``MeZO.perturb``, ``--zo_kernel compiled``): z a
  hash of each element's global index, drawn and applied in place by one compiled kernel;
  Gaussian and Rademacher;
* ``blocks``: the first release's pass: layout-invariant blocks of z, drawn by a thread pool on
  CPU, applied in place; Gaussian and Rademacher;
* ``... 1 thread``: each CPU path again with one intra-op thread (what a rank with one core gets);
* ``triton`` (CUDA with triton only): the fused pass, z drawn in registers; also reported
  against the GPU's memory bandwidth (a pass reads and writes every parameter once).

    python benchmarks/perturb.py                # results/perturb.{json,md,png}
    python benchmarks/perturb.py --repeats 10

Requirements beyond the package: matplotlib for the chart (``pip install matplotlib``); without
it the chart is skipped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import machine, parser, pyplot, save_figure, timed, write_results  # noqa: E402

# SmolLM2-135M's shapes (its config.json): tied embeddings, 30 layers, hidden 576, GQA 9/3 heads.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def build_model(device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    return model.eval()


def reference_pass(model: torch.nn.Module, eps: float, seed: int) -> None:
    # The reference reseeds the global generator and draws z per parameter, out of place.
    torch.manual_seed(seed)
    for _, p in model.named_parameters():
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + eps * z


def measure(device: torch.device, repeats: int) -> list[dict]:
    from mezo_dist import MeZO, wrap
    from mezo_dist.distributed import DistState

    model = build_model(device)
    numel = sum(p.numel() for p in model.parameters())
    state = DistState(rank=0, world_size=1, local_rank=0, device=device, backend="")
    rows = []

    def row(name: str, kind: str, seconds: float) -> None:
        rows.append({"path": name, "perturbation": kind, "seconds": seconds, "elements": numel,
                     "elements_per_s": numel / seconds})
        print(f"{name:>16} {kind:>10}: {seconds * 1e3:8.1f} ms  {numel / seconds / 1e9:6.3f} G elements/s", flush=True)

    def one_thread(name: str, kind: str, fn) -> None:
        if device.type == "cpu" and torch.get_num_threads() > 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                row(f"{name} 1 thread", kind, timed(fn, device, repeats))
            finally:
                torch.set_num_threads(threads)

    with torch.no_grad():
        ref = lambda: reference_pass(model, 1e-3, 1)  # noqa: E731
        row("reference", "gaussian", timed(ref, device, repeats))
        one_thread("reference", "gaussian", ref)
        kernels = ["compiled", "blocks"] + (["triton"] if device.type == "cuda" and _has_triton() else [])
        for kernel in kernels:
            for kind in ("gaussian", "rademacher"):
                zo = MeZO(wrap(model, state), lr=0.0, eps=1e-3, perturbation=kind, kernel=kernel)
                t0 = time.perf_counter()
                zo.perturb(7, 1e-3)  # the compiled path compiles (or loads its cache) here
                if kernel == "compiled":
                    print(f"{'':>16} first compiled pass (compile included): {time.perf_counter() - t0:.1f} s")
                row(kernel, kind, timed(lambda: zo.perturb(7, 1e-3), device, repeats))
                one_thread(kernel, kind, lambda: zo.perturb(7, 1e-3))
    return rows


def _has_triton() -> bool:
    from mezo_dist.zo.passes import triton_available

    return triton_available()


def bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 28, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() * 4 / t


def _same_threads(rows: list[dict], row: dict, path: str, kind: str | None = None) -> dict | None:
    # The row of ``path`` measured with as many threads as ``row`` (``... 1 thread`` rows pair up).
    suffix = " 1 thread" if row["path"].endswith(" 1 thread") else ""
    return next((r for r in rows if r["path"] == path + suffix and r["perturbation"] == (kind or row["perturbation"])),
                None)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Perturbation pass: {meta['elements'] / 1e6:.1f}M parameters (SmolLM2-135M shapes), fp32",
             "", f"Machine: {meta['machine']}. Median of {meta['repeats']} passes after one warm-up. Ratios "
             "compare rows with the same thread count, measured in one run.", "",
             "| path | z | ms per pass | ns per element | G elements/s | vs reference | vs blocks |"
             + (" vs copy bandwidth |" if meta["bw"] else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if meta["bw"] else "")]
    for r in rows:
        ref = _same_threads(rows, r, "reference", "gaussian") or rows[0]
        blocks = _same_threads(rows, r, "blocks")
        vs_blocks = f"{r['elements_per_s'] / blocks['elements_per_s']:.2f}x" if blocks else "-"
        line = (f"| {r['path']} | {r['perturbation']} | {r['seconds'] * 1e3:.1f} | {r['seconds'] / r['elements'] * 1e9:.2f} | "
                f"{r['elements_per_s'] / 1e9:.3f} | {r['elements_per_s'] / ref['elements_per_s']:.2f}x | {vs_blocks} |")
        if meta["bw"]:
            # A pass reads and writes each fp32 element once: 8 bytes.
            line += f" {8 * r['elements_per_s'] / meta['bw']:.0%} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> bool:
    plt = pyplot("perturb")
    if plt is None:
        return False
    labels = [f"{r['path']}\n{r['perturbation']}" for r in rows]
    values = [r["elements_per_s"] / 1e9 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar(labels, values, color=["#999999" if r["path"].startswith("reference") else
                                  "#d9822b" if r["path"].startswith("compiled") else "#3b75af" for r in rows])
    ax.set_ylabel("G elements / s (higher is better)")
    ax.set_title("One perturbation pass over 134.5M parameters")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return True


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = measure(device, args.repeats)
    meta = {"elements": rows[0]["elements"], "repeats": args.repeats, "machine": machine(threads=True),
            "bw": bandwidth(device)}
    write_results(args.results, "perturb", meta, rows, markdown(rows, meta), chart)


if __name__ == "__main__":
    main()
