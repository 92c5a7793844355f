"""Multi-node launch recipes on loopback: two "nodes" of one rank each, started as two concurrent
launcher processes on this machine (node ranks 0 and 1, the head at 127.0.0.1), must reach the
parameters of one process with the same global batch (4 = 2 nodes x micro-batch 2), within 1e-5.

torchrun with ``--nnodes 2 --node_rank r`` (what launch/slurm/train.sbatch runs on each node) and
``accelerate launch --num_machines 2 --machine_rank r`` with the shipped multi-node configs
(whose 8-GPU process counts are overridden on the command line) are exercised end to end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.distributed.test_equivalence import COMMON, STEPS, run, trajectory, weights
from tests.helpers import ROOT, free_port, launch_env


def torchrun_node(rank: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]


def accelerate_node(config: str):
    def cmd(rank: int, port: int) -> list[str]:
        return ["accelerate", "launch", "--config_file", f"launch/accelerate/{config}", "--num_machines", "2",
                "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port)]

    return cmd


def run_nodes(node_cmd, args: list[str], timeout: int = 300) -> None:
    """Start both nodes at once (each in its own session), wait for both; kill both on timeout."""
    port = free_port()
    procs = [subprocess.Popen(node_cmd(rank, port) + ["launch/train.py", *args], cwd=ROOT, env=launch_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank in (0, 1)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.communicate()
        raise AssertionError(f"a node did not finish within {timeout}s") from None
    for rank, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {rank} exited {p.returncode}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-6000:]}"


@pytest.fixture(scope="module")
def reference(tiny_models, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_multinode")
    return run("python", tiny_models["opt"], text_file, out, ["--backend", "single"], micro_batch=4)


CASES = [
    ("torchrun", torchrun_node, ["--backend", "fsdp"], "fsdp"),
    ("accelerate-fsdp", accelerate_node("fsdp_multinode.yaml"), [], "fsdp"),
    ("accelerate-zero3", accelerate_node("zero3_multinode.yaml"), [], "zero3"),
]


@pytest.mark.parametrize("node_cmd,extra,backend", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_two_nodes_equal_one_process(node_cmd, extra, backend, reference, tiny_models, text_file, tmp_path):
    import json

    out = tmp_path / "out"
    run_nodes(node_cmd, ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
                         "--output_dir", str(out), "--per_device_train_batch_size", "2", *COMMON, *extra])
    summary = json.loads((out / "train_results.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == backend
    assert [r["seed"] for r in trajectory(out)] == [r["seed"] for r in trajectory(reference)]
    assert len(trajectory(out)) == STEPS
    w_ref, w_got = weights(reference / "final"), weights(out / "final")
    start = weights(tiny_models["opt"])
    assert max((w_ref[k] - start[k]).abs().max().item() for k in w_ref) > 1e-3, "training did not move the parameters"
    worst = max((w_ref[k] - w_got[k]).abs().max().item() for k in w_ref)
    print(f"\n2 nodes ({backend}) vs 1 process: max |diff| = {worst:.3g}")
    assert worst <= 1e-5, worst
