"""Ctrl-C and SIGTERM under real launchers: one line naming the checkpoint a resume starts from,
the signal's exit code, every rank out, and outputs a resume continues from."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from mezo_dist.checkpoint import list_checkpoints
from mezo_dist.interrupt import GRACE_S
from tests.helpers import free_port, launch, rank_pids, start_cmd

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def args(model: Path, text: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(text), "--output_dir", str(out),
            "--max_steps", str(steps), "--save_steps", "3", "--per_device_train_batch_size", "2",
            "--max_length", "16", "--learning_rate", "1e-3", "--disable_tqdm", "--report_to", "none", *extra]


def wait_for(cond, what: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def finish(proc, timeout: float = 120.0) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the interrupted run did not exit") from None
    return proc.returncode, err


def assert_one_line(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("mezo_dist: error:")]
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), (lines, err[-3000:])
    # No rank printed a traceback (a launcher may print its own, about itself).
    assert not re.search(r'File ".*mezo_dist/', err) and "KeyboardInterrupt" not in err, err[-3000:]


def assert_consistent(out: Path) -> int:
    """What an interrupt leaves: complete checkpoints, a trajectory of whole lines from step 0
    (the last may be cut), no export, nothing half-published."""
    lines = (out / "trajectory.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    assert [r["step"] for r in rows] == list(range(len(rows)))
    assert not (out / "final").exists()
    found = list_checkpoints(out)
    assert found and all((c / "index.json").exists() and (c / "trainer_state.json").exists() for c in found)
    return int(found[-1].name.split("-")[1])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_process_stops_with_one_line_and_resumes(sig, tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    proc = start_cmd([sys.executable, "launch/train.py", *args(tiny_models["opt"], text_file, out, 100000)])
    wait_for(lambda: list_checkpoints(out), "the first checkpoint")
    proc.send_signal(sig)
    code, err = finish(proc)
    assert code == 128 + sig, err[-3000:]
    step = assert_consistent(out)
    name = signal.Signals(sig).name
    assert_one_line(err, rf"mezo_dist: error: interrupted by {name}; --resume_from_checkpoint latest resumes from "
                         rf"{re.escape(str(out))}/checkpoint-\d+")
    if sig == signal.SIGINT:
        resumed = launch("python", "launch/train.py", args(tiny_models["opt"], text_file, out, step + 1,
                                                            "--resume_from_checkpoint", "latest"))
        assert f"at step {step}" in resumed.stdout
        rows = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(step + 1)) and (out / "final").is_dir()


def test_sigint_to_one_rank_stops_both_with_one_line_then_resumes(tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    flags = args(tiny_models["opt"], text_file, out, 100000, "--backend", "fsdp")
    proc = start_cmd([*TORCHRUN, "--master_port", str(free_port()), "launch/train.py", *flags])
    wait_for(lambda: list_checkpoints(out), "the first checkpoint")
    os.kill(rank_pids(proc.pid)[1], signal.SIGINT)
    code, err = finish(proc)
    assert code != 0
    assert_one_line(err, rf"mezo_dist: error: interrupted by SIGINT on rank 1; --resume_from_checkpoint latest "
                         rf"resumes from {re.escape(str(out))}/checkpoint-\d+")
    assert "exitcode  : 130" in err  # the launcher's report: the interrupted rank exited with 130
    step = assert_consistent(out)
    resumed = launch("torchrun", "launch/train.py", args(tiny_models["opt"], text_file, out, step + 1, "--backend", "fsdp",
                                                         "--resume_from_checkpoint", "latest"))
    assert f"at step {step}" in resumed.stdout


def test_ctrl_c_on_the_launcher_group_is_one_line(tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    flags = args(tiny_models["opt"], text_file, out, 100000, "--backend", "fsdp")
    proc = start_cmd([*TORCHRUN, "--master_port", str(free_port()), "launch/train.py", *flags])
    wait_for(lambda: list_checkpoints(out), "the first checkpoint")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the launcher and every rank
    code, err = finish(proc)
    assert code != 0
    assert_one_line(err, r"mezo_dist: error: interrupted by SIGINT on rank [01]; --resume_from_checkpoint latest "
                         r"resumes from .*/checkpoint-\d+")
    assert_consistent(out)


def test_a_rank_blocked_in_a_collective_still_stops(tiny_models, text_file, tmp_path):
    """Rank 1 stalls at step 4 (a test fault), so rank 0 waits for it inside a collective, where
    Python cannot run a signal handler: the watchdog ends rank 0, the launcher then rank 1."""
    out, marker = tmp_path / "out", tmp_path / "stalled"
    flags = args(tiny_models["opt"], text_file, out, 100000, "--backend", "fsdp")
    proc = start_cmd([*TORCHRUN, "--master_port", str(free_port()), "launch/train.py", *flags],
                     MEZO_DIST_TEST_STALL=f"1:4:{marker}")
    wait_for(marker.exists, "the stall")
    time.sleep(2.0)  # rank 0 is now waiting for rank 1 in step 4's first gather
    sent = time.monotonic()
    os.kill(rank_pids(proc.pid)[0], signal.SIGTERM)
    code, err = finish(proc)
    assert time.monotonic() - sent < GRACE_S + 30, "the stalled job outlived the watchdog"
    assert code != 0
    assert_one_line(err, rf"mezo_dist: error: interrupted by SIGTERM on rank 0; --resume_from_checkpoint latest "
                         rf"resumes from {re.escape(str(out))}/checkpoint-3")
    assert assert_consistent(out) == 3
