"""The harness every benchmark shares: its command line, the machine's description, runs of the
ranks it launches, the random-weight model it measures, and one way to write its results (JSON,
markdown, a PNG). Also real sentences as training text, TensorBoard scalars of a run, and the
backprop ds_config with torch's AdamW.

Methods carry one vocabulary everywhere: ``mezo`` and ``backprop`` (the ``--trainer`` values
``zo`` and ``regular`` of ``launch/train.py``), and the zeroth-order optimizers by their
``--zo_optimizer`` names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# A method's name in the results -> launch/train.py's --trainer.
TRAINER_FLAG = {"mezo": "zo", "backprop": "regular"}


def parser(doc: str | None, *, timeout: int | None = None, model_shape: tuple[int, int, int] | None = None
           ) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--results`` (where its files go), with ``timeout`` a
    ``--timeout`` per launched run, with ``model_shape`` (hidden, layers, ffn) the random OPT's."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON, markdown and PNG")
    if timeout is not None:
        p.add_argument("--timeout", type=int, default=timeout, help="seconds per launched run")
    if model_shape is not None:
        hidden, layers, ffn = model_shape
        p.add_argument("--hidden", type=int, default=hidden, help="random OPT: hidden size")
        p.add_argument("--layers", type=int, default=layers, help="random OPT: decoder layers")
        p.add_argument("--ffn", type=int, default=ffn, help="random OPT: feed-forward size")
    return p


def random_opt(folder: Path, args: argparse.Namespace) -> tuple[Path, object, int]:
    """The random-weight OPT of ``--hidden/--layers/--ffn`` written to ``folder``: (path, its
    config, its parameter count)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mezo_dist.testing import make_tiny_model

    model = make_tiny_model(folder, "opt", hidden=args.hidden, layers=args.layers, ffn=args.ffn)
    cfg = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        n_params = sum(t.numel() for t in AutoModelForCausalLM.from_config(cfg).parameters())
    return model, cfg, n_params


def describe_opt(cfg, n_params: int) -> str:
    return (f"random-weight OPT, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, ffn {cfg.ffn_dim}, "
            f"{n_params / 1e6:.1f}M parameters")


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine(*, threads: bool = False, comm: str | None = None) -> str:
    """Architecture, cores, torch (with ``threads`` this process's torch threads, with ``comm``
    the ranks' communication backend), and the GPU if there is one."""
    import torch

    text = f"{platform.machine()}, {cores()} CPU cores"
    if threads:
        text += f", {torch.get_num_threads()} threads"
    text += f", torch {torch.__version__}"
    if comm:
        text += f", {comm}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def threads_per_rank(world: int) -> int:
    """The cores shared out among ``world`` ranks on this host (at least one thread each)."""
    return max(1, cores() // world)


def rank_env(world: int) -> dict[str, str]:
    """The environment of launched ranks: this process's, without a launcher's rank variables
    (they would be taken for this run's), the cores shared out, DeepSpeed on the CPU unless told."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = str(threads_per_rank(world))
    env.update(DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_ranks(cmd: list[str], world: int, *, timeout: float | None, what: str) -> tuple[float, str, str]:
    """``cmd`` (a script and its arguments) on ``world`` ranks of this host: plain python for one,
    ``torchrun`` above. It runs in a session of its own, so that a timeout ends the launcher and
    its ranks; a failure raises with the run's last output. Returns (wall seconds, stdout, stderr)."""
    prefix = [sys.executable]
    if world > 1:
        prefix += ["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(free_port())]
    t0 = time.perf_counter()
    with subprocess.Popen(prefix + [str(c) for c in cmd], cwd=ROOT, env=rank_env(world), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise RuntimeError(f"{what}: timed out after {timeout}s") from None
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    return time.perf_counter() - t0, out, err


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


def write_results(folder, name: str, meta: dict, rows: list, markdown: str, chart, *, extra: dict | None = None) -> None:
    """``<name>.json`` (meta, rows and ``extra``), ``<name>.md`` and ``<name>.png`` (``chart(rows, path)``,
    which may decline without matplotlib) under ``folder``, each written atomically; the markdown is
    printed too."""
    from mezo_dist.io import atomic_write_text

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps({"meta": meta, "rows": rows, **(extra or {})}, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", markdown)
    chart(rows, out / f"{name}.png")
    print(markdown)


def pyplot(script: str):
    """matplotlib's pyplot on the file-only backend, or None (said once) where matplotlib is not
    installed: charts are optional, the JSON and markdown are the results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{script}: matplotlib is not installed, no chart (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


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
