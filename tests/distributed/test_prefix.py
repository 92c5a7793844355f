"""Prefix tuning with MeZO on 2-rank FSDP2 and ZeRO-3 reaches one process's prefix (the prefix
starts from real activations on every backend), and the export loads with peft."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_equivalence import zero3_config
from tests.helpers import launch

ARGS = ["--prefix_tuning", "--num_prefix", "4", "--max_steps", "4", "--max_length", "32", "--learning_rate", "1e-2",
        "--seed", "3", "--disable_tqdm", "--report_to", "none"]


@pytest.fixture(scope="module")
def runs(tiny_models, text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    common = ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file), *ARGS]
    launch("one", "launch/train.py", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp / "one")])
    launch("ranks", "launch/train.py", [*common, "--backend", "fsdp", "--per_device_train_batch_size", "2",
                                           "--output_dir", str(tmp / "fsdp")])
    # Threshold 0: the prefix is partitioned too, not kept whole on every rank.
    launch("ranks", "launch/train.py", [*common, "--ds_config", zero3_config(tmp, 0),
                                            "--per_device_train_batch_size", "2", "--output_dir", str(tmp / "zero3")])
    return tmp


@pytest.mark.parametrize("layout", ["fsdp", "zero3"])
def test_sharded_prefix_matches_one_process(layout, runs):
    one = load_file(str(runs / "one" / "final" / "adapter_model.safetensors"))
    got = load_file(str(runs / layout / "final" / "adapter_model.safetensors"))
    assert set(one) == set(got) == {"prompt_embeddings"}
    assert (one["prompt_embeddings"] - got["prompt_embeddings"]).abs().max().item() <= 1e-5


def test_exported_prefix_loads_with_peft(runs, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["opt"]), runs / "zero3" / "final")
    saved = load_file(str(runs / "one" / "final" / "adapter_model.safetensors"))["prompt_embeddings"]
    loaded = model.prompt_encoder[model.active_adapter].embedding.weight
    assert torch.allclose(loaded, saved, atol=1e-5)
