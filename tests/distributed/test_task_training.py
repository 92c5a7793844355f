"""Task training under every backend: the same trajectory and metrics as one process, with the
candidate loss and with a non-differentiable objective (accuracy itself as the loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.distributed.test_equivalence import zero3_config
from tests.helpers import launch

BASE = ["--task_name", "SST2", "--num_train", "64", "--num_dev", "16", "--num_eval", "24", "--max_steps", "4",
        "--eval_steps", "2", "--learning_rate", "1e-3", "--disable_tqdm", "--report_to", "none"]
MODES = {
    "non_diff": ["--non_diff", "--objective", "accuracy", "--zo_eps", "0.1"],
    "classification": ["--train_as_classification", "--zo_eps", "1e-3"],
}


def run(launcher: str, flags: list[str], micro: int, model: Path, data: Path, out: Path) -> Path:
    launch(launcher, "launch/train.py", ["--model_name_or_path", str(model), "--data_dir", str(data),
                                         "--output_dir", str(out), "--per_device_train_batch_size", str(micro),
                                         *BASE, *flags])
    return out


def read(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "eval_results.json").read_text())


@pytest.mark.parametrize("mode,launcher,backend", [
    ("non_diff", "ranks", "fsdp"),
    ("non_diff", "ranks", "zero3"),
    ("classification", "ranks", "zero3"),
])
def test_task_training_matches_one_process(mode, launcher, backend, tiny_models, real_data, tmp_path):
    model = tiny_models["opt"]
    one = run("one", MODES[mode], 4, model, real_data, tmp_path / "one")
    extra = ["--backend", "fsdp"] if backend == "fsdp" else ["--ds_config", zero3_config(tmp_path, 0)]
    two = run(launcher, [*MODES[mode], *extra], 2, model, real_data, tmp_path / "two")
    (rows1, res1), (rows2, res2) = read(one), read(two)
    for a, b in zip(rows1, rows2, strict=True):
        assert math.isclose(a["projected_grad"], b["projected_grad"], rel_tol=1e-4, abs_tol=1e-6), (a, b)
    assert res1 == res2  # accuracy before and after, best dev step: all the same
    if mode == "non_diff":
        # The loss is minus the accuracy on the global batch of 4: L+ - L- is a multiple of 1/4.
        steps = [r["projected_grad"] * 2 * 0.1 * 4 for r in rows2]
        assert all(abs(s - round(s)) < 1e-9 for s in steps), steps
        assert any(r["projected_grad"] != 0 for r in rows2)
