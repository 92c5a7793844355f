"""Every task runs with its defaults: zero-shot needs only the evaluation split, training sizes
follow the paper (fewer dev rows for the small CB and COPA), and the training loss defaults to the
reference's per-task choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mezo_dist.cli import main
from mezo_dist.config import parse_args
from mezo_dist.tasks import TASK_NAMES, get_task

# Tasks without a local copy of their data: a few rows in the official release schema.
RECORD_ROW = {
    "passage": {"text": "Ada Lovelace met Charles Babbage in London.\n@highlight\nThey worked on the engine.",
                "entities": [{"start": 0, "end": 11}, {"start": 17, "end": 31}, {"start": 36, "end": 41}]},
    "qas": [{"id": "q0", "query": "@placeholder wrote the first program.",
             "answers": [{"start": 0, "end": 11, "text": "Ada Lovelace"}]}],
}
DROP_ROW = {
    "passage": "The home team scored 3 touchdowns in the first half and 2 in the second.",
    "qa_pairs": [{"query_id": "d0", "question": "How many touchdowns in the first half?",
                  "answer": {"number": "3", "date": {"day": "", "month": "", "year": ""}, "spans": []}},
                 {"query_id": "d1", "question": "Who scored?",
                  "answer": {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["the home team"]}}],
}


def eval_only_dir(tmp: Path, real_data: Path, name: str) -> Path | None:
    """A data folder that holds the task's evaluation split and nothing else (None: the task's
    embedded default data)."""
    task = get_task(name)
    if name == "Polarity":
        return None
    folder = tmp / "data" / task.task_dir
    folder.mkdir(parents=True)
    target = folder / f"{task.splits[task.eval_split]}.jsonl"
    if name == "ReCoRD":
        target.write_text("\n".join(json.dumps(RECORD_ROW) for _ in range(3)) + "\n")
    elif name == "DROP":
        target.write_text("\n".join(json.dumps(DROP_ROW) for _ in range(3)) + "\n")
    else:
        target.symlink_to(real_data / task.task_dir / target.name)
    return tmp / "data"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_zero_shot_runs_with_defaults_on_the_evaluation_split_alone(name, tmp_path, tiny_models, real_data):
    data = eval_only_dir(tmp_path, real_data, name)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_models["llama"]), "--task_name", name, "--eval_only",
            "--output_dir", str(out), "--num_eval", "16", "--disable_tqdm", "--report_to", "none"]
    if data is not None:
        argv += ["--data_dir", str(data)]
    assert main(argv) == 0
    res = json.loads((out / "eval_results.json").read_text())
    metric = "eval_f1" if get_task(name).kind == "generation" else "eval_accuracy"
    assert 0.0 <= res[metric] <= 1.0 and res["eval_count"] >= 1


def test_in_context_learning_reads_the_training_split(tmp_path, tiny_models, real_data, capsys):
    data = eval_only_dir(tmp_path, real_data, "RTE")
    argv = ["--model_name_or_path", str(tiny_models["llama"]), "--task_name", "RTE", "--eval_only",
            "--num_demos", "2", "--data_dir", str(data), "--output_dir", str(tmp_path / "out"),
            "--disable_tqdm", "--report_to", "none"]
    assert main(argv) == 2
    assert "train.jsonl does not exist" in capsys.readouterr().err


def test_training_defaults_follow_the_paper(real_data):
    for name in TASK_NAMES:
        task = get_task(name)
        assert task.num_dev == (100 if name in ("CB", "Copa") else 500)
        assert task.train_as_classification == (name not in ("Copa", "ReCoRD", "SQuAD", "DROP"))
    for name in ("CB", "Copa", "RTE"):  # the sizes the paper's defaults draw fit every local split
        task = get_task(name)
        train, dev, _ = task.sample_splits(1000, task.num_dev, 0, 0, data_dir=real_data)
        assert len(dev) == task.num_dev and len(train) >= 100


def test_task_defaults_fill_only_what_the_user_left_unset(tiny_models):
    base = ["--model_name_or_path", str(tiny_models["llama"]), "--report_to", "none"]
    cfg = parse_args(base + ["--task_name", "CB"])
    assert cfg.task.num_dev == 100 and cfg.task.train_as_classification is True
    cfg = parse_args(base + ["--task_name", "Copa", "--num_dev", "7", "--train_as_classification"])
    assert cfg.task.num_dev == 7 and cfg.task.train_as_classification is True
    cfg = parse_args(base + ["--task_name", "SST2", "--train_as_classification", "false"])
    assert cfg.task.train_as_classification is False and cfg.task.num_dev == 500


def test_demo_defaults_fill_only_the_flags_the_user_left_untyped(tiny_models, tmp_path):
    """Demo mode (no task, no train file) takes the demo's values for untyped flags; a typed flag
    keeps its value even when that value is the flag's own default."""
    base = ["--model_name_or_path", str(tiny_models["llama"]), "--report_to", "none",
            "--output_dir", str(tmp_path / "out")]
    cfg = parse_args(base)
    assert cfg.task.task_name == "Polarity"
    assert (cfg.optim.learning_rate, cfg.run.per_device_train_batch_size, cfg.task.num_eval) == (3e-5, 16, 200)
    typed = ["--learning_rate", "1e-6", "--per_device_train_batch_size", "8", "--num_eval", "1000",
             "--eval_steps", "0"]  # each one the flag's dataclass default
    cfg = parse_args(base + typed)
    assert (cfg.optim.learning_rate, cfg.run.per_device_train_batch_size, cfg.task.num_eval) == (1e-6, 8, 1000)
    assert cfg.task.eval_steps == 0
    assert (cfg.task.task_name, cfg.task.num_dev, cfg.run.max_steps) == ("Polarity", 100, 90)  # untyped: the demo's
