"""MeZOTrainer (a transformers.Trainer): on one process the same parameters as launch/train.py on
the same batches, a resumed Trainer run equal to the uninterrupted one, and 2 ranks under
``accelerate launch`` with ZeRO-3 (``TrainingArguments(deepspeed=...)``) equal to one process.

How the batches are made identical: the text file holds only texts of at least ``MAX_LENGTH``
characters, so with the tiny models' character tokenizer every example is exactly ``MAX_LENGTH``
tokens (no padding, labels = input ids on both sides). The Trainer script
(tests/distributed/workers/hf_trainer.py) lays the examples out in the order launch/train.py's
``GlobalOrder`` visits them for the global batch, and Trainer reads them sequentially
(``train_sampling_strategy="sequential"``): step t of both runs takes the same rows, and both sum
the same next-token losses (``mezo_dist.objectives.causal_lm_loss``) under the same seed and lr.
On 2 ranks accelerate's sampler hands rank r the r-th micro-batch of each step's rows: the global
batch is the same, and the step's one all-reduce sums the two halves' losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mezo_dist.cli import main as train_main
from tests.distributed.workers import hf_trainer
from tests.helpers import ROOT, launch

MAX_LENGTH, STEPS, GLOBAL_BATCH, SEED = 24, 6, 4, 7


@pytest.fixture(scope="module")
def long_texts(text_file, tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in text_file.read_text().splitlines()]
    out = tmp_path_factory.mktemp("hf_data") / "long.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if len(r["text"]) >= MAX_LENGTH))
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def trajectory(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]


def script_args(model: Path, texts: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--texts", str(texts), "--output_dir", str(out), "--steps", str(STEPS),
            "--global_batch", str(GLOBAL_BATCH), "--max_length", str(MAX_LENGTH), "--seed", str(SEED), *extra]


def train_argv(model: Path, texts: Path, out: Path) -> list[str]:
    """launch/train.py with the Trainer script's settings."""
    return ["--model_name_or_path", str(model), "--train_file", str(texts), "--output_dir", str(out),
            "--backend", "single", "--per_device_train_batch_size", str(GLOBAL_BATCH), "--max_steps", str(STEPS),
            "--max_length", str(MAX_LENGTH), "--learning_rate", "1e-3", "--zo_eps", "1e-3", "--weight_decay", "0.1",
            "--lr_scheduler_type", "linear", "--seed", str(SEED), "--disable_tqdm", "--report_to", "none"]


def trainer_run(model: Path, texts: Path, out: Path, *extra: str) -> Path:
    hf_trainer.main(script_args(model, texts, out, *extra))
    return out


@pytest.fixture(scope="module")
def runs(tiny_models, long_texts, tmp_path_factory):
    """launch/train.py's run and the Trainer's, uninterrupted, on the same batches."""
    model, tmp = tiny_models["opt"], tmp_path_factory.mktemp("hf_runs")
    ref = tmp / "train_py"
    assert train_main(train_argv(model, long_texts, ref)) == 0
    hf = trainer_run(model, long_texts, tmp / "trainer")
    return {"model": model, "texts": long_texts, "ref": ref, "hf": hf, "tmp": tmp}


def test_trainer_reaches_launch_train_parameters(runs):
    ref, hf = trajectory(runs["ref"]), trajectory(runs["hf"])
    assert len(ref) == len(hf) == STEPS
    for a, b in zip(ref, hf):
        assert (a["step"], a["seed"], a["lr"]) == (b["step"], b["seed"], b["lr"]), (a, b)
        # One process, the same tensors and the same float64 sums: the same numbers bit for bit.
        assert a["projected_grad"] == b["projected_grad"] and a["loss"] == b["loss"], (a, b)
    start, w_ref, w_hf = weights(runs["model"]), weights(runs["ref"] / "final"), weights(runs["hf"] / "final")
    assert max((w_ref[k] - start[k]).abs().max().item() for k in w_ref) > 1e-3, "training did not move the weights"
    assert set(w_ref) == set(w_hf)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_hf[k]), f"{k} differs by {(w_ref[k] - w_hf[k]).abs().max().item()}"
    placed = json.loads((runs["hf"] / "placement.json").read_text())
    assert placed["placement"] == "single" and placed["world_size"] == 1
    # Trainer's own log: one loss per step (logging_steps=1), the step's mean of L+ and L-.
    assert [round(h["loss"], 4) for h in placed["log"]] == [round(r["loss"], 4) for r in ref]


@pytest.mark.parametrize("name", ["fzoo", "sparse"])
def test_trainer_runs_the_projects_other_optimizers_as_launch_train(name, runs):
    """zo_optimizer takes mezo_dist.zo.optimizers by name, with launch/train.py's defaults (fzoo:
    8 rademacher directions; sparse: 75% of each parameter frozen): the same rows and weights."""
    ref = runs["tmp"] / f"train_py_{name}"
    assert train_main(train_argv(runs["model"], runs["texts"], ref) + ["--zo_optimizer", name]) == 0
    hf = trainer_run(runs["model"], runs["texts"], runs["tmp"] / f"trainer_{name}", "--zo_optimizer", name)
    assert trajectory(ref) == trajectory(hf)
    w_ref, w_hf = weights(ref / "final"), weights(hf / "final")
    assert all(torch.equal(w_ref[k], w_hf[k]) for k in w_ref)


def test_trainer_resume_equals_uninterrupted_run(runs):
    out = runs["tmp"] / "resumed"
    trainer_run(runs["model"], runs["texts"], out, "--save_steps", "3", "--stop_at", "3")
    assert (out / "checkpoint-3" / "zo_checkpoint").is_dir() and not (out / "final").exists()
    assert len(trajectory(out)) == 3
    trainer_run(runs["model"], runs["texts"], out, "--save_steps", "3", "--resume", str(out / "checkpoint-3"))
    assert trajectory(out) == trajectory(runs["hf"])
    w_full, w_res = weights(runs["hf"] / "final"), weights(out / "final")
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), f"{k} differs by {(w_full[k] - w_res[k]).abs().max().item()}"


def test_accumulation_sums_micro_batches_under_one_perturbation(runs):
    """gradient_accumulation_steps=2 with micro-batches of 2: the step's loss is the global
    batch's, so the run reaches the parameters of micro-batches of 4 (other forward shapes:
    equal within fp32 rounding, not bit for bit)."""
    out = trainer_run(runs["model"], runs["texts"], runs["tmp"] / "accumulated", "--accumulation", "2")
    for a, b in zip(trajectory(runs["hf"]), trajectory(out)):
        assert (a["seed"], a["lr"]) == (b["seed"], b["lr"])
        assert b["projected_grad"] == pytest.approx(a["projected_grad"], rel=1e-4, abs=1e-6), (a, b)
    w_one, w_acc = weights(runs["hf"] / "final"), weights(out / "final")
    worst = max((w_one[k] - w_acc[k]).abs().max().item() for k in w_one)
    assert worst <= 1e-5, f"final parameters differ by {worst}"


@pytest.mark.parametrize("launcher,placement", [("accelerate-zero3", "zero3"), ("torchrun", "single")])
def test_two_ranks_equal_one_process(launcher, placement, runs, tmp_path):
    """The Trainer's DeepSpeed path under accelerate launch: a forward-only ZeRO-3 engine built
    from the shipped ds_config (no optimizer, so no fp32 masters copied back over MeZO's edits);
    and under torchrun, DDP replicas whose step runs the module inside DDP. 2 CPU ranks each."""
    out = tmp_path / placement
    extra = ["--ds_config", str(ROOT / "ds_configs" / "zero3.json")] if placement == "zero3" else []
    launch(launcher, "tests/distributed/workers/hf_trainer.py", script_args(runs["model"], runs["texts"], out, *extra))
    placed = json.loads((out / "placement.json").read_text())
    assert placed["placement"] == placement and placed["world_size"] == 2
    one, two = trajectory(runs["hf"]), trajectory(out)
    assert len(two) == STEPS
    for a, b in zip(one, two):
        assert (a["seed"], a["lr"]) == (b["seed"], b["lr"])
        # The float64 loss sums are added in another order over 2 ranks.
        assert b["projected_grad"] == pytest.approx(a["projected_grad"], rel=1e-4, abs=1e-6), (a, b)
    w_one, w_two = weights(runs["hf"] / "final"), weights(out / "final")
    assert set(w_one) == set(w_two)
    worst = max((w_one[k] - w_two[k]).abs().max().item() for k in w_one)
    assert worst <= 1e-5, f"final parameters differ by {worst}"
