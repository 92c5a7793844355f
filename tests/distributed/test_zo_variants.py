"""MeZO variants keep layout invariance: accumulated micro-batches and several directions per
step give one process's parameters on 2-rank FSDP2 and ZeRO-3, and the seed log replays them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import launch

ARGS = ["--max_steps", "4", "--max_length", "32", "--learning_rate", "1e-3", "--zo_eps", "1e-3", "--weight_decay", "0.1",
        "--seed", "11", "--zo_num_directions", "3", "--disable_tqdm", "--report_to", "none"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tiny_models, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("zo_one")
    launch("one", "launch/train.py", ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
                                         "--output_dir", str(out), "--per_device_train_batch_size", "4", *ARGS])
    return out


@pytest.mark.parametrize("launcher,flags", [
    ("ranks", ["--backend", "fsdp"]),
    ("ranks", ["--ds_config", "ds_configs/zero3.json"]),
])
def test_accumulated_multi_direction_mezo_matches_one_process(launcher, flags, one_process, tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    # 2 ranks x micro-batch 1 x 2 accumulated = one process's batch of 4.
    launch(launcher, "launch/train.py", ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
                                         "--output_dir", str(out), "--per_device_train_batch_size", "1",
                                         "--gradient_accumulation_steps", "2", *flags, *ARGS])
    rows = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (one_process / "trajectory.jsonl").read_text().splitlines()]
    assert all(len(r["directions"]) == 3 for r in rows)
    for r, q in zip(rows, ref):
        assert [s for s, _ in r["directions"]] == [s for s, _ in q["directions"]]
        assert [g for _, g in r["directions"]] == pytest.approx([g for _, g in q["directions"]], rel=1e-4, abs=1e-6)
    base = weights(tiny_models["opt"])
    assert max_diff(weights(one_process / "final"), base) > 1e-5
    assert max_diff(weights(one_process / "final"), weights(out / "final")) <= 1e-5


def test_replay_rebuilds_a_multi_direction_run(one_process, tiny_models, tmp_path):
    launch("one", "launch/replay.py", ["--model_name_or_path", str(tiny_models["opt"]),
                                          "--trajectory", str(one_process / "trajectory.jsonl"),
                                          "--output_dir", str(tmp_path / "rebuilt")])
    assert max_diff(weights(one_process / "final"), weights(tmp_path / "rebuilt")) <= 1e-6
