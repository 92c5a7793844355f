"""Task runs on one process: zero-shot and in-context evaluation, and what they write."""

from __future__ import annotations

import json

from mezo_dist.cli import main


def run(tmp_path, model, data, *flags):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
            "--task_name", "RTE", "--num_dev", "0", "--num_eval", "12", "--max_length", "256",
            "--eval_batch_size", "4", "--disable_tqdm", "--report_to", "none", *flags]
    assert main(argv) == 0
    return out


def test_zero_shot_eval_only_writes_metrics_and_nothing_else(tmp_path, tiny_models, real_data, capsys):
    out = run(tmp_path, tiny_models["llama"], real_data, "--eval_only", "--num_train", "0")
    res = json.loads((out / "eval_results.json").read_text())
    assert res["eval_count"] == 12 and 0.0 <= res["eval_accuracy"] <= 1.0
    assert res["eval_accuracy"] == res["initial_eval_accuracy"]
    assert not (out / "final").exists() and "before training" in capsys.readouterr().out


def test_in_context_demonstrations_change_the_prompts(tmp_path, tiny_models, real_data):
    from mezo_dist.scoring import demonstrations, with_demonstrations
    from mezo_dist.tasks import get_task

    task = get_task("RTE")
    train, _, evals = task.sample_splits(8, 0, 2, 0, data_dir=real_data)
    demos = demonstrations(train, 2, 0)
    shown = with_demonstrations(evals[0], demos)
    assert shown.context.endswith(evals[0].context) and len(shown.context) > len(evals[0].context)
    assert shown.candidates == evals[0].candidates and shown.gold == evals[0].gold
    out = run(tmp_path, tiny_models["opt"], real_data, "--eval_only", "--num_train", "8", "--num_demos", "2")
    assert json.loads((out / "eval_results.json").read_text())["eval_count"] == 12
