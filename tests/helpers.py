"""Helpers for tests that start real launchers (kept out of conftest so tests can import them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """Real task files; ``MEZO_DIST_DATA`` overrides the default beside the checkout."""
    return Path(os.environ.get("MEZO_DIST_DATA", ROOT.parent / "shared" / "data"))


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, once per session (its dataclasses look their module
    up in ``sys.modules`` while they are built)."""
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Two ranks on two cores: one thread each, or forwards run several times slower.
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_cmd(cmd: list[str], *, timeout: int = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    # A session of its own, so that a timeout ends the launcher *and* the ranks under it.
    with subprocess.Popen(cmd, cwd=ROOT, env=launch_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"command timed out after {timeout}s: {' '.join(cmd)}\n{err[-4000:]}") from None
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def start_cmd(cmd: list[str], **env: str) -> subprocess.Popen:
    """Start ``cmd`` without waiting (its own session, as in :func:`run_cmd`), for tests that
    signal it while it runs."""
    return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes under ``launcher_pid`` whose environment names a RANK."""
    found, todo = {}, [launcher_pid]
    while todo:
        pid = todo.pop(0)  # breadth first: a rank before the helpers it starts
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        todo += [int(c) for c in children]
        rank = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if rank and pid != launcher_pid:
            found.setdefault(int(rank[0]), pid)
    return found


def export_files(folder: Path) -> dict[str, Path]:
    """Every tensor key of a Hugging Face export -> the safetensors file holding it (its one file,
    or the files its index names)."""
    import json

    from safetensors import safe_open

    index = Path(folder) / "model.safetensors.index.json"
    if index.exists():
        return {k: Path(folder) / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: Path(folder) / "model.safetensors" for k in f.keys()}


def assert_same_export(got: Path, want: Path, *, what: str = "") -> None:
    """The two exports hold the same keys and, bit for bit, the same values and dtypes; read one
    tensor at a time, so large exports are never held whole."""
    import torch
    from safetensors import safe_open

    a, b = export_files(got), export_files(want)
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:10]}"
    for key in b:
        with safe_open(str(a[key]), framework="pt") as fa, safe_open(str(b[key]), framework="pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {key} differs"


LAUNCHERS = {
    "python": lambda port: [sys.executable],
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(port)],
    "deepspeed": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port)],
    "accelerate-zero3": lambda port: ["accelerate", "launch", "--config_file", "launch/accelerate/zero3.yaml",
                                      "--main_process_port", str(port)],
    "accelerate-fsdp": lambda port: ["accelerate", "launch", "--config_file", "launch/accelerate/fsdp.yaml",
                                     "--main_process_port", str(port)],
}


def launch(launcher: str, script: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``script`` under a real launcher (2 CPU ranks, except plain python), or with
    ``launcher="ranks"`` on the session's two pooled ranks (tests/rank_pool.py): the same entry
    point on a gloo group that is already up, without a launcher's start-up (``"one"``: one
    pooled process, as plain python runs it). Tests whose subject is not the launcher use them.

    A run that passes must not leave DeepSpeed's per-rank shared-memory segments behind (each is
    69 MB of the host's memory until reboot); those of a run that failed are removed here.
    """
    if launcher in POOLS:
        return _launch_on_pool(POOLS[launcher], script, args, **kw)
    port = free_port()
    ok = False
    try:
        proc = run_cmd(LAUNCHERS[launcher](port) + [script, *args], **kw)
        ok = True
    finally:
        left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        for f in left:
            f.unlink(missing_ok=True)
    if ok and left:
        raise AssertionError(f"the run left shared-memory segments behind: {[f.name for f in left]}")
    return proc


# Pooled "launchers" (tests/rank_pool.py) and the real launcher each stands in for.
POOLS = {"ranks": 2, "one": 1}


def _launch_on_pool(world: int, script: str, args: list[str], *, timeout: int = 600, check: bool = True,
                    **env: str) -> subprocess.CompletedProcess:
    from tests.rank_pool import run_entry_point, shared_pool

    if env.keys() & {"MEZO_DIST_TEST_KILL", "MEZO_DIST_TEST_DIE_IN_SAVE", "MEZO_DIST_TEST_STALL"}:
        # A rank that dies or stalls on purpose needs a launcher to notice it (in the pool it
        # would end the pool): those runs go through a real one.
        return launch("torchrun" if world > 1 else "python", script, args, timeout=timeout, check=check, **env)
    results = shared_pool(world).run(run_entry_point, script, list(args), env, timeout=timeout)
    codes = [code for code, _, _ in results]
    # As torchrun reports it: the first failing rank's code, both ranks' output.
    code = next((c for c in codes if c != 0), 0)
    out, err = "".join(o for _, o, _ in results), "".join(e for _, _, e in results)
    cmd = ["<ranks>", script, *args]
    if check and code != 0:
        raise AssertionError(f"command failed ({codes}): {' '.join(cmd)}\n--- stdout ---\n{out[-4000:]}"
                             f"\n--- stderr ---\n{err[-8000:]}")
    return subprocess.CompletedProcess(cmd, code, out, err)


def run_fused_tests_under_interpreter(test_file: str) -> None:
    """Run the ``test_fused*`` tests of ``test_file`` in a process started with TRITON_INTERPRET=1
    (Triton chooses the interpreter when it is imported, so a running process cannot switch), and
    fail unless every one of them ran and passed. Skips where CUDA runs them in place."""
    import importlib.util

    import pytest

    from mezo_dist.zo import passes

    if passes.triton_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("the fused tests run in this process")
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("triton is not installed: the fused pass cannot be tested (scripts/setup.sh installs it)")
        pytest.skip("needs triton (its interpreter runs the fused pass on CPU)")
    proc = run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k",
                    "test_fused and not interpreter"], timeout=600, TRITON_INTERPRET="1")
    tail = proc.stdout.strip().splitlines()[-1]
    assert "passed" in tail and "skipped" not in tail and "failed" not in tail, proc.stdout[-3000:]
