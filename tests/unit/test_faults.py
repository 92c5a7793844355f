"""Non-finite losses and drifting replicas: what a run does when a step goes wrong."""

from __future__ import annotations

import json

import pytest

from mezo_dist.cli import main
from tests.distributed.test_equivalence import weights
from tests.helpers import launch


def argv(model, text, out, steps, *extra):
    return ["--model_name_or_path", str(model), "--train_file", str(text), "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--max_length", "24",
            "--learning_rate", "1e-3", "--disable_tqdm", "--report_to", "none", *extra]


def test_a_non_finite_step_is_skipped_and_leaves_the_weights(tiny_models, text_file, tmp_path, monkeypatch, capsys):
    m = tiny_models["opt"]
    assert main(argv(m, text_file, tmp_path / "two", 2)) == 0
    monkeypatch.setenv("MEZO_DIST_TEST_NAN_STEPS", "2")
    assert main(argv(m, text_file, tmp_path / "three", 3)) == 0
    assert "step 2: non-finite loss" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "three" / "trajectory.jsonl").read_text().splitlines()]
    assert rows[2].get("skipped") is True and "skipped" not in rows[1]
    assert json.loads((tmp_path / "three" / "train_results.json").read_text())["skipped_steps"] == 1
    before, after = weights(tmp_path / "two" / "final"), weights(tmp_path / "three" / "final")
    # +eps z, -2 eps z, +eps z in fp32 restores the weights to within rounding, not bit for bit.
    assert max((before[k] - after[k]).abs().max().item() for k in before) <= 1e-6


def test_too_many_skipped_steps_stop_the_run(tiny_models, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEZO_DIST_TEST_NAN_STEPS", "0,1")
    code = main(argv(tiny_models["opt"], text_file, tmp_path / "out", 4, "--max_skipped_steps", "1"))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "mezo_dist: error: 2 steps had a non-finite loss, more than --max_skipped_steps 1"
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out" / "final").exists()


def test_drifting_replicas_are_an_error(tiny_models, text_file, tmp_path):
    proc = launch("torchrun", "launch/train.py",
                  argv(tiny_models["opt"], text_file, tmp_path / "out", 6, "--backend", "single", "--check_replicas_steps", "2"),
                  check=False, MEZO_DIST_TEST_DRIFT="1:2")
    assert proc.returncode != 0
    assert "replicas drifted apart by step 4" in proc.stderr
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("steps", [4])
def test_replicas_that_agree_pass_the_check(steps, tiny_models, text_file, tmp_path):
    launch("torchrun", "launch/train.py",
           argv(tiny_models["opt"], text_file, tmp_path / "out", steps, "--backend", "single", "--check_replicas_steps", "1"))
    assert (tmp_path / "out" / "final" / "config.json").exists()
