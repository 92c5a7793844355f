"""The backprop baseline (``--trainer regular``) on the same stack: 2-rank FSDP2, 2-rank ZeRO-3
(DeepSpeed's engine and optimizer, also with the optimizer offloaded to the host as
ds_configs/zero3_adamw_offload.json ships it) and 2-rank data parallel (DDP) reach the parameters of
one process with the same global batch, also when the batch is split into accumulated
micro-batches; and the loss goes down."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.test_equivalence import zero3_config
from tests.helpers import launch

STEPS = 5
ARGS = ["--trainer", "regular", "--max_steps", str(STEPS), "--max_length", "32", "--learning_rate", "1e-3",
        "--weight_decay", "0.1", "--lr_scheduler_type", "linear", "--max_grad_norm", "1.0", "--seed", "3",
        "--disable_tqdm", "--report_to", "none"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).named_parameters()}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "trajectory.jsonl").read_text().splitlines()]


def zero3_adamw(tmp: Path) -> str:
    """The shipped backprop config, with torch's AdamW (the same update as the other placements;
    DeepSpeed's fused Adam would round differently and needs a compiled op), every parameter
    partitioned."""
    return zero3_config(tmp, 0, base="zero3_adamw.json", optimizer_params={"torch_adam": True})


def zero3_adamw_offload(tmp: Path, *, torch_adam: bool) -> str:
    """The shipped ZeRO-Offload config (optimizer states and step on the host), every parameter
    partitioned; with ``torch_adam`` the host step is torch's AdamW instead of DeepSpeedCPUAdam
    (DeepSpeed insists on its own unless ``zero_force_ds_cpu_optimizer`` is off)."""
    path = Path(zero3_config(tmp, 0, base="zero3_adamw_offload.json",
                             optimizer_params={"torch_adam": True} if torch_adam else None))
    if torch_adam:
        cfg = json.loads(path.read_text())
        cfg["zero_force_ds_cpu_optimizer"] = False
        path.write_text(json.dumps(cfg))
    return str(path)


def optimizer_used(out: Path) -> str:
    return json.loads((out / "train_results.json").read_text())["optimizer"]


@pytest.fixture(scope="module")
def one_process(tiny_models, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bp_one")
    launch("one", "launch/train.py", ["--model_name_or_path", str(tiny_models["llama"]), "--train_file", str(text_file),
                                         "--output_dir", str(out), "--per_device_train_batch_size", "4", *ARGS])
    return out


# launcher, flags, micro-batch, accumulation, the optimizer train_results.json must name.
CASES = {
    "fsdp": ("ranks", ["--backend", "fsdp"], 2, 1, "AdamW"),
    "fsdp-accumulated": ("ranks", ["--backend", "fsdp"], 1, 2, "AdamW"),
    "ddp": ("ranks", ["--backend", "single"], 2, 1, "AdamW"),
    "zero3-accumulated": ("ranks", ["--ds_config", "{zero3}"], 1, 2, "AdamW"),
    "zero3-optimizer-offload": ("ranks", ["--ds_config", "{zero3_offload}"], 2, 1, "AdamW (states on cpu)"),
    # DeepSpeed's own host Adam, as shipped: compiled at first use (a minute or two, once).
    "zero3-optimizer-offload-cpuadam": ("ranks", ["--ds_config", "{zero3_offload_cpuadam}"], 2, 1,
                                        "DeepSpeedCPUAdam (states on cpu)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backprop_matches_one_process(case, one_process, tiny_models, text_file, tmp_path):
    launcher, flags, micro, accum, optimizer = CASES[case]
    if case.endswith("cpuadam") and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("DeepSpeedCPUAdam is compiled at first use and no C++ compiler is on PATH")
    configs = {"zero3": lambda: zero3_adamw(tmp_path),
               "zero3_offload": lambda: zero3_adamw_offload(tmp_path, torch_adam=True),
               "zero3_offload_cpuadam": lambda: zero3_adamw_offload(tmp_path, torch_adam=False)}
    flags = [configs[f[1:-1]]() if f.startswith("{") else f for f in flags]
    out = tmp_path / "out"
    launch(launcher, "launch/train.py", ["--model_name_or_path", str(tiny_models["llama"]), "--train_file", str(text_file),
                                         "--output_dir", str(out), "--per_device_train_batch_size", str(micro),
                                         "--gradient_accumulation_steps", str(accum), *flags, *ARGS])
    ref, got = weights(one_process / "final"), weights(out / "final")
    base = weights(tiny_models["llama"])
    moved = max((ref[k] - base[k]).abs().max().item() for k in ref)
    assert moved > 1e-3, "AdamW at lr 1e-3 must move the weights"
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-6
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    assert optimizer_used(out) == optimizer


def test_backprop_loss_goes_down(one_process):
    trace = losses(one_process)
    assert len(trace) == STEPS and trace[-1] < trace[0] - 0.05, trace


def test_activation_checkpointing_changes_memory_not_results(one_process, tiny_models, text_file, tmp_path):
    out = tmp_path / "ckpt"
    launch("one", "launch/train.py", ["--model_name_or_path", str(tiny_models["llama"]), "--train_file", str(text_file),
                                         "--output_dir", str(out), "--per_device_train_batch_size", "4",
                                         "--gradient_checkpointing", *ARGS])
    ref, got = weights(one_process / "final"), weights(out / "final")
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-6


def test_bf16_mixed_precision_on_every_backend_tracks_one_process(tiny_models, text_file, tmp_path):
    """--precision bf16 with fp32 parameters: autocast (single), FSDP2's MixedPrecisionPolicy,
    DeepSpeed's bf16 engine. bf16 forwards round differently per layout, so compare the losses
    loosely, and check that they fall."""
    common = ["--model_name_or_path", str(tiny_models["llama"]), "--train_file", str(text_file), *ARGS,
              "--precision", "bf16"]
    traces = {}
    for name, launcher, flags, micro in (("one", "one", [], 4), ("fsdp", "ranks", ["--backend", "fsdp"], 2),
                                         ("zero3", "ranks", ["--ds_config", zero3_adamw(tmp_path)], 2)):
        out = tmp_path / name
        launch(launcher, "launch/train.py", [*common, *flags, "--per_device_train_batch_size", str(micro),
                                             "--output_dir", str(out)])
        traces[name] = losses(out)
    assert traces["one"][-1] < traces["one"][0] - 0.05
    for name in ("fsdp", "zero3"):
        assert traces[name] == pytest.approx(traces["one"], rel=2e-3), name


def test_backprop_on_a_task_with_dev_selection_under_zero3(tiny_models, real_data, tmp_path):
    """The baseline's evaluation forwards leave DeepSpeed's backward prefetch in flight; the
    best-dev checkpoint and the export must still see settled partitions, and match one process."""
    # Llama: no dropout, so train-mode forwards agree across layouts (OPT would draw dropout masks).
    common = ["--model_name_or_path", str(tiny_models["llama"]), "--task_name", "SST2", "--data_dir", str(real_data),
              "--num_train", "16", "--num_dev", "8", "--num_eval", "8", "--eval_steps", "2", "--max_steps", "4",
              "--trainer", "regular", "--learning_rate", "1e-3", "--train_as_classification", "--disable_tqdm",
              "--report_to", "none"]
    launch("one", "launch/train.py", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    launch("ranks", "launch/train.py", [*common, "--ds_config", zero3_adamw(tmp_path), "--per_device_train_batch_size",
                                            "2", "--output_dir", str(tmp_path / "z3")])
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    z3 = json.loads((tmp_path / "z3" / "eval_results.json").read_text())
    assert z3["best_step"] == one["best_step"] and z3["eval_accuracy"] == one["eval_accuracy"]
    ref, got = weights(tmp_path / "one" / "final"), weights(tmp_path / "z3" / "final")
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5
