"""What several benchmarks share: the machine's description, real sentences as training text,
TensorBoard scalars of a run, a free port for a launcher, and the backprop ds_config with torch's
AdamW."""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """Architecture, the cores this process may use, torch, and the GPU if there is one."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    text = f"{platform.machine()}, {cores} CPU cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def sync(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; CPU work is done on return)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int = 1) -> float:
    """Median seconds of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (buffers, thread
    pools, kernel compilation), the device synchronised around each call."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def write_results(folder, name: str, meta: dict, rows: list, markdown: str, chart) -> None:
    """``<name>.json`` (meta and rows), ``<name>.md`` and ``<name>.png`` (``chart(rows, path)``) under
    ``folder``, each written atomically; the markdown is printed too."""
    from mezo_dist.io import atomic_write_text

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", markdown)
    chart(rows, out / f"{name}.png")
    print(markdown)


def save_figure(fig, path: Path, *, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def data_dir() -> Path:
    return Path(os.environ.get("MEZO_DIST_DATA", ROOT.parent / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_text_data(path: Path, n: int, min_chars: int) -> None:
    """``n`` texts of real sentences (SST-2 train) joined until each has ``min_chars`` characters,
    so that every example fills the token budget and every batch has the same shape."""
    src = data_dir() / "sst2" / "train.jsonl"
    if not src.is_file():
        raise SystemExit(f"no real sentences at {src} (set MEZO_DIST_DATA to the folder holding sst2/train.jsonl)")
    texts, cur = [], ""
    with open(src, encoding="utf-8") as f:
        for line in f:
            cur = f"{cur} {json.loads(line)['sentence'].strip()}".strip()
            if len(cur) >= min_chars:
                texts.append(cur)
                cur = ""
                if len(texts) == n:
                    break
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} texts of {min_chars} characters in {src}")
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def adamw_torch_config(tmp: Path) -> Path:
    """The shipped backprop ZeRO-3 config with torch's AdamW (DeepSpeed's needs a compiled op)."""
    cfg = json.loads((ROOT / "ds_configs" / "zero3_adamw.json").read_text())
    cfg["optimizer"]["params"]["torch_adam"] = True
    path = tmp / "zero3_adamw_torch.json"
    path.write_text(json.dumps(cfg))
    return path
