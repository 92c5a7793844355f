"""A masked LM (random-weight RoBERTa) fine-tuned with MeZO on SST-2 with the paper's prompt
reaches the same parameters and metrics on 1 process, 2-rank FSDP2 and 2-rank ZeRO-3."""

from __future__ import annotations

import json

import pytest

from tests.helpers import launch


def weights(folder):
    from transformers import AutoModelForMaskedLM

    return {k: v.detach().clone() for k, v in AutoModelForMaskedLM.from_pretrained(folder).named_parameters()}


@pytest.fixture(scope="module")
def runs(tiny_models, real_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlm")
    common = ["--model_name_or_path", str(tiny_models["roberta"]), "--task_name", "SST2", "--template", "paper",
              "--data_dir", str(real_data), "--num_train", "16", "--num_dev", "4", "--num_eval", "8",
              "--max_steps", "4", "--learning_rate", "1e-2", "--zo_eps", "1e-3", "--train_as_classification",
              "--max_length", "96", "--disable_tqdm", "--report_to", "none"]
    launch("one", "launch/train.py", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp / "one")])
    launch("ranks", "launch/train.py", [*common, "--backend", "fsdp", "--per_device_train_batch_size", "2",
                                           "--output_dir", str(tmp / "fsdp")])
    launch("ranks", "launch/train.py", [*common, "--ds_config", "ds_configs/zero3.json",
                                            "--per_device_train_batch_size", "2", "--output_dir", str(tmp / "zero3")])
    return tmp


@pytest.mark.parametrize("layout", ["fsdp", "zero3"])
def test_masked_lm_matches_one_process(layout, runs, tiny_models):
    one, got, base = weights(runs / "one" / "final"), weights(runs / layout / "final"), weights(tiny_models["roberta"])
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-4, "MeZO did not move the masked LM"
    assert max((one[k] - got[k]).abs().max().item() for k in one) <= 1e-5
    a = json.loads((runs / "one" / "eval_results.json").read_text())
    b = json.loads((runs / layout / "eval_results.json").read_text())
    assert a["eval_accuracy"] == b["eval_accuracy"] and a["initial_eval_accuracy"] == b["initial_eval_accuracy"]
