"""A run writes what the README promises: trajectory, TensorBoard, checkpoints, a loadable model."""

import json
import math

import torch

from mezo_dist.cli import main


def test_single_process_run_writes_every_output(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(tiny_models["llama"]), "--train_file", str(text_file),
            "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "2",
            "--per_device_train_batch_size", "3", "--max_length", "24", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "linear", "--disable_tqdm"]
    assert main(argv) == 0

    rows = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(set(r) == {"step", "seed", "projected_grad", "loss", "lr", "eps", "wd", "perturbation", "noise"}
               for r in rows)
    # The default kernel draws z from the hash stream; the row says so, so replay draws the same z.
    assert all(r["perturbation"] == "gaussian" and r["noise"] == "hash" for r in rows)
    assert all(math.isfinite(r["projected_grad"]) and r["loss"] > 0 for r in rows)
    assert [r["lr"] for r in rows] == [1e-3, 7.5e-4, 5e-4, 2.5e-4]  # linear decay to 0 at step 4

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/projected_grad", "train/lr", "perf/step_time_s", "perf/tokens_per_s",
            "memory/peak_gib_rank0"} <= tags

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    assert max((x - y).abs().max().item() for x, y in zip(final.parameters(), start.parameters())) > 0
    assert not any(p.name.startswith(".") for p in out.iterdir()), "temporary files left behind"
    summary = json.loads((out / "train_results.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0 and summary["backend"] == "single"
    assert isinstance(final, torch.nn.Module)


def test_fsdp_runs_as_one_process_too(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    argv = ["--backend", "fsdp", "--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_length", "16", "--disable_tqdm", "--report_to", "none"]
    assert main(argv) == 0
    assert (out / "final" / "config.json").exists()


def test_report_to_names_accelerates_trackers():
    """--report_to is read against accelerate's tracker registry: none, all (the installed
    ones), or names, comma-separated and deduplicated; tensorboard writes under the run folder."""
    from accelerate.tracking import get_available_trackers

    from mezo_dist.metrics import tracker_names

    assert tracker_names("none") == []
    assert tracker_names("tensorboard, tensorboard") == ["tensorboard"]
    assert tracker_names("all") == [str(t) for t in get_available_trackers()]
    assert "tensorboard" in tracker_names("all")
