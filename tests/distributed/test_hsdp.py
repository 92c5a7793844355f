"""Hybrid sharding (HSDP): FSDP2 on a (replicate, shard) mesh, 4 CPU ranks as 2 "nodes" x 2.

* The same run on a 2 x 2 mesh (micro-batch 1 on each of 4 ranks) reaches the parameters of one
  process (micro-batch 4), within 1e-5.
* During a MeZO step the only collective whose group spans both replica groups is the all-reduce
  of three numbers (sum L+, sum L-, weight); FSDP2's parameter all-gathers stay inside each shard
  group. Collectives are logged with their group's ranks by the worker, and the profiler's count
  of gloo collectives must match the log (nothing unlogged).
"""

from __future__ import annotations

import json
import sys

import pytest

from mezo_dist.cli import main
from tests.distributed.test_equivalence import COMMON, STEPS, run, trajectory, weights
from tests.helpers import free_port, run_cmd


def torchrun4(script: str, args: list[str]) -> None:
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(free_port()),
             script, *args], timeout=300)


def test_hsdp_2x2_equals_one_process(tiny_models, text_file, tmp_path):
    model = tiny_models["opt"]
    ref = run("python", model, text_file, tmp_path / "ref", ["--backend", "single"], micro_batch=4)
    out = tmp_path / "hsdp"
    torchrun4("launch/train.py", ["--model_name_or_path", str(model), "--train_file", str(text_file),
                                  "--output_dir", str(out), "--per_device_train_batch_size", "1", *COMMON,
                                  "--backend", "fsdp", "--hsdp_replicas", "2"])
    a, b = trajectory(ref), trajectory(out)
    assert len(a) == len(b) == STEPS and [r["seed"] for r in a] == [r["seed"] for r in b]
    w_ref, w_got = weights(ref / "final"), weights(out / "final")
    start = weights(model)
    assert max((w_ref[k] - start[k]).abs().max().item() for k in w_ref) > 1e-3, "training did not move the parameters"
    worst = max((w_ref[k] - w_got[k]).abs().max().item() for k in w_ref)
    print(f"\nHSDP 2x2 vs 1 process: max |diff| = {worst:.3g}")
    assert worst <= 1e-5, worst
    assert json.loads((out / "train_results.json").read_text())["world_size"] == 4


def test_only_the_scalar_all_reduce_crosses_replicas(tiny_models, tmp_path):
    out = tmp_path / "report.json"
    torchrun4("tests/distributed/workers/hsdp_step.py", ["2", str(tiny_models["opt"]), str(out)])
    for rank in range(4):
        report = json.loads((tmp_path / f"report.json.rank{rank}").read_text())
        assert report["mesh"] == [[0, 1], [2, 3]] and report["placements"] == ["R", "S(0)"]
        row = next(r for r in report["mesh"] if rank in r)
        ops = report["collectives"]
        assert len(ops) == len(report["profiler_gloo_ops"]), "a collective escaped the log"
        crossing = [c for c in ops if sum(any(x in r for x in c["ranks"]) for r in report["mesh"]) > 1]
        inside = [c for c in ops if c not in crossing]
        assert crossing == [{"op": "all_reduce", "ranks": [0, 1, 2, 3], "numel": 3, "bytes": 24}], crossing
        assert inside and all(c["op"] == "all_gather_single" and c["ranks"] == row for c in inside), inside
        if rank == 0:
            print(f"\nper MeZO step on rank 0: across replicas {sum(c['bytes'] for c in crossing)} bytes in "
                  f"{len(crossing)} collective; inside the shard group {sum(c['bytes'] for c in inside)} bytes "
                  f"in {len(inside)} all-gathers")


@pytest.mark.parametrize("flags,world,pattern", [
    (["--backend", "fsdp", "--hsdp_replicas", "3"], "4", r"--hsdp_replicas 3 does not divide the world size 4"),
    (["--backend", "single", "--hsdp_replicas", "2"], "4", r"--hsdp_replicas is for the fsdp backend, not single"),
    (["--backend", "fsdp", "--hsdp_replicas", "0"], "1", r"--hsdp_replicas must be >= 1, got 0"),
])
def test_bad_hsdp_flags_get_one_line(flags, world, pattern, tiny_models, text_file, tmp_path, capsys, monkeypatch):
    import re

    monkeypatch.setenv("WORLD_SIZE", world)
    argv = ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
            "--output_dir", str(tmp_path / "out"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err


def test_hsdp_checkpoint_resumes_on_one_process(tiny_models, text_file, tmp_path):
    """Both replica groups hold the same shards; the first one writes them, and the checkpoint
    resumes on one process to the same parameters as the uninterrupted 2 x 2 run."""
    model = tiny_models["opt"]
    out = tmp_path / "hsdp"
    base = ["--model_name_or_path", str(model), "--train_file", str(text_file), *COMMON]
    torchrun4("launch/train.py", [*base, "--output_dir", str(out), "--per_device_train_batch_size", "1",
                                  "--backend", "fsdp", "--hsdp_replicas", "2", "--save_steps", str(STEPS // 2)])
    resumed = tmp_path / "resumed"
    run_cmd([sys.executable, "launch/train.py", *base, "--output_dir", str(resumed), "--per_device_train_batch_size", "4",
             "--resume_from_checkpoint", str(out / f"checkpoint-{STEPS // 2}")])
    w_hsdp, w_resumed = weights(out / "final"), weights(resumed / "final")
    assert max((w_hsdp[k] - w_resumed[k]).abs().max().item() for k in w_hsdp) <= 1e-5
