"""MeZO with LoRA adapters (peft): the same adapters on 1 process, 2-rank FSDP2 and ZeRO-3, only adapters
change, and the seed log replays them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_equivalence import zero3_config
from tests.helpers import launch

ARGS = ["--lora", "--lora_r", "4", "--max_steps", "6", "--max_length", "32", "--learning_rate", "1e-2",
        "--zo_eps", "1e-3", "--seed", "3", "--disable_tqdm", "--report_to", "none"]


def adapters(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def lora_runs(tiny_models, text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    common = ["--model_name_or_path", str(tiny_models["llama"]), "--train_file", str(text_file), *ARGS]
    launch("one", "launch/train.py", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp / "one")])
    launch("ranks", "launch/train.py", [*common, "--backend", "fsdp", "--per_device_train_batch_size", "2",
                                           "--output_dir", str(tmp / "two")])
    # Threshold 0: the adapters are partitioned too, not kept whole on every rank.
    launch("ranks", "launch/train.py", [*common, "--ds_config", zero3_config(tmp, 0),
                                            "--per_device_train_batch_size", "2", "--output_dir", str(tmp / "zero3")])
    return tmp


@pytest.mark.parametrize("layout", ["two", "zero3"])
def test_lora_sharded_matches_one_process_and_trains_only_adapters(layout, lora_runs):
    one, two = adapters(lora_runs / "one" / "final"), adapters(lora_runs / layout / "final")
    assert one and all("lora_" in k for k in one), "the export must hold the adapters alone"
    assert max_diff(one, two) <= 1e-5
    b_weights = [v for k, v in one.items() if "lora_B" in k]
    assert max(v.abs().max().item() for v in b_weights) > 0, "LoRA B starts at zero; MeZO must have moved it"


@pytest.mark.parametrize("launcher,flags", [("one", []), ("ranks", ["--backend", "fsdp"])])
def test_replay_rebuilds_lora_adapters(launcher, flags, lora_runs, tiny_models, tmp_path):
    launch(launcher, "launch/replay.py", ["--model_name_or_path", str(tiny_models["llama"]), "--lora", "--lora_r", "4",
                                          "--trajectory", str(lora_runs / "one" / "trajectory.jsonl"),
                                          "--output_dir", str(tmp_path / "rebuilt"), *flags])
    assert max_diff(adapters(lora_runs / "one" / "final"), adapters(tmp_path / "rebuilt")) <= 1e-6


def test_mezo_never_touches_frozen_base_weights(tiny_models):
    from transformers import AutoModelForCausalLM

    from mezo_dist import MeZO, wrap
    from mezo_dist.config import PeftArguments
    from mezo_dist.models import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_models["opt"]),
                       PeftArguments(lora=True, lora_r=2))
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    ids = torch.arange(4, 20).reshape(2, 8)
    zo = MeZO(wrap(model), lr=1e-1, eps=1e-3)
    for _ in range(3):
        zo.step(lambda: model(input_ids=ids, labels=ids).loss)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[k], v) for k, v in frozen.items())
    assert any(not torch.equal(now[k], v) for k, v in trainable.items())
