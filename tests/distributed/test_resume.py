"""Checkpoints, exact resume on another world size or backend, seed-log replay, and faults.

Every comparison is against one uninterrupted 12-step run on one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.test_equivalence import weights, zero3_config
from tests.helpers import launch

STEPS = 12
ARGS = ["--max_steps", str(STEPS), "--save_steps", "3", "--max_length", "32", "--learning_rate", "1e-3",
        "--zo_eps", "1e-3", "--weight_decay", "0.1", "--lr_scheduler_type", "linear", "--seed", "5",
        "--disable_tqdm", "--report_to", "none"]
GLOBAL_BATCH = 4

# name -> (launcher, extra flags builder, world size)
LAYOUTS = {
    "single1": ("one", lambda tmp: ["--backend", "single"], 1),
    "fsdp2": ("ranks", lambda tmp: ["--backend", "fsdp"], 2),
    "zero3_2": ("ranks", lambda tmp: ["--ds_config", zero3_config(tmp, None)], 2),
}


def train(layout: str, model: Path, text: Path, out: Path, tmp: Path, *extra: str, check: bool = True, **env):
    launcher, flags, world = LAYOUTS[layout]
    args = ["--model_name_or_path", str(model), "--train_file", str(text), "--output_dir", str(out),
            "--per_device_train_batch_size", str(GLOBAL_BATCH // world), *ARGS, *flags(tmp), *extra]
    return launch(launcher, "launch/train.py", args, check=check, **env)


def trajectory(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]


def assert_same_run(ref: Path, out: Path, *, tol: float = 1e-5) -> None:
    a, b = trajectory(ref), trajectory(out)
    assert [r["step"] for r in b] == list(range(STEPS))
    assert [r["seed"] for r in a] == [r["seed"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["projected_grad"] - y["projected_grad"]) <= 1e-4 * max(1.0, abs(x["projected_grad"])), (x, y)
    w_ref, w_out = weights(ref / "final"), weights(out / "final")
    worst = max((w_ref[k] - w_out[k]).abs().max().item() for k in w_ref)
    assert worst <= tol, f"final parameters differ by {worst}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, text_file, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    train("single1", tiny_models["opt"], text_file, tmp / "out", tmp)
    return tmp / "out"


@pytest.mark.parametrize("first,second", [("fsdp2", "single1"), ("single1", "zero3_2"), ("zero3_2", "zero3_2")])
def test_kill_then_resume_on_any_layout_equals_the_uninterrupted_run(
    first, second, uninterrupted, tiny_models, text_file, tmp_path
):
    out = tmp_path / "out"
    # The last rank SIGKILLs itself as step 7 starts: checkpoint-6 is the newest complete one.
    _, _, world = LAYOUTS[first]
    killed = train(first, tiny_models["opt"], text_file, out, tmp_path, check=False, MEZO_DIST_TEST_KILL=f"{world - 1}:7")
    assert killed.returncode != 0
    assert (out / "checkpoint-6" / "index.json").exists() and not (out / "final").exists()
    assert len(trajectory(out)) >= 6
    resumed = train(second, tiny_models["opt"], text_file, out, tmp_path, "--resume_from_checkpoint", "latest")
    assert "at step 6" in resumed.stdout
    assert_same_run(uninterrupted, out)


def test_torchrun_restart_resumes_by_itself(uninterrupted, tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "killed-once"
    launcher_args = ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
                     "--output_dir", str(out), "--per_device_train_batch_size", "2", "--backend", "fsdp",
                     "--resume_from_checkpoint", "latest", *ARGS]
    import sys

    from tests.helpers import free_port, run_cmd

    # Elastic rendezvous (c10d), as for real restartable jobs: each restart meets afresh.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "launch/train.py", *launcher_args]
    proc = run_cmd(cmd, MEZO_DIST_TEST_KILL=f"0:8:{marker}")
    assert marker.exists(), "the fault never fired"
    assert "at step 6" in proc.stdout
    assert_same_run(uninterrupted, out)


def test_death_mid_checkpoint_never_leaves_a_valid_looking_checkpoint(uninterrupted, tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    died = train("fsdp2", tiny_models["opt"], text_file, out, tmp_path, "--save_steps", "5", check=False,
                 MEZO_DIST_TEST_DIE_IN_SAVE="1")
    assert died.returncode != 0
    assert not list(out.glob("checkpoint-*")), "a half-written checkpoint looks complete"
    # Nothing to resume from: 'latest' starts afresh and still ends where it should.
    train("fsdp2", tiny_models["opt"], text_file, out, tmp_path, "--resume_from_checkpoint", "latest")
    assert_same_run(uninterrupted, out)


@pytest.mark.parametrize("layout", ["single1", "fsdp2"])
def test_replay_from_the_seed_log_rebuilds_the_weights(layout, uninterrupted, tiny_models, tmp_path):
    launcher, flags, _ = LAYOUTS[layout]
    launch(launcher, "launch/replay.py", ["--model_name_or_path", str(tiny_models["opt"]),
                                          "--trajectory", str(uninterrupted / "trajectory.jsonl"),
                                          "--output_dir", str(tmp_path / "rebuilt"), *flags(tmp_path)])
    w_ref, w_out = weights(uninterrupted / "final"), weights(tmp_path / "rebuilt")
    assert max((w_ref[k] - w_out[k]).abs().max().item() for k in w_ref) <= 1e-6
    size = (uninterrupted / "trajectory.jsonl").stat().st_size
    assert size / STEPS < 300, "the seed log should cost a few hundred bytes per step"


def test_a_corrupt_file_only_one_rank_reads_stops_every_rank_with_one_line(tiny_models, text_file, tmp_path):
    """Under 2-rank FSDP2 each rank reads only its own file: rank 1 finds the flipped byte, tells
    rank 0, and both stop with the same error (rank 0 prints it) instead of diverging."""
    out = tmp_path / "out"
    train("fsdp2", tiny_models["opt"], text_file, out, tmp_path, "--max_steps", "3")
    shard = out / "checkpoint-3" / "rank-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    proc = train("fsdp2", tiny_models["opt"], text_file, out, tmp_path, "--max_steps", "3",
                 "--resume_from_checkpoint", "latest", check=False, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mezo_dist: error:")]
    assert lines == [f"mezo_dist: error: checkpoint {out}/checkpoint-3 is corrupt: rank-00001.safetensors does not "
                     "match its sha256"], proc.stderr[-3000:]
    import re

    assert not re.search(r'File ".*mezo_dist/', proc.stderr), "a rank printed a traceback"
