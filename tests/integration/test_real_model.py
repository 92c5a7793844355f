"""The real default model on real data. Slow (about a minute to load and score on 2 CPU cores):
run with ``python -m pytest -m slow``."""

from __future__ import annotations

import json

import pytest

from tests.helpers import launch


@pytest.mark.slow
def test_smollm2_zero_shot_sst2_is_at_least_70_percent(real_data, tmp_path):
    out = tmp_path / "zero_shot"
    launch("python", "launch/train.py", [
        "--task_name", "SST2", "--data_dir", str(real_data), "--eval_only", "--num_train", "0", "--num_dev", "0",
        "--num_eval", "200", "--eval_batch_size", "16", "--output_dir", str(out), "--disable_tqdm",
    ], timeout=1800, OMP_NUM_THREADS="2")
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_count"] == 200
    assert results["eval_accuracy"] >= 0.70, results
