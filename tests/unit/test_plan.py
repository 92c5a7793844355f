"""The capacity planner: exact parameter counts, the MeZO paper's headline, one-line bad input.

The headline (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes",
abstract and memory comparison): on one 80 GB A100, fine-tuning with backpropagation and Adam
fits OPT-2.7B but not 6.7B, while MeZO fits OPT-30B (fp16) but not 66B; OPT-66B with MeZO needs
two such GPUs. The paper profiles memory on MultiRC, about 400 tokens per example: batch 1 x 400.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mezo_dist import plan
from tests.helpers import ROOT

A100 = 80 * plan.GiB
PAPER = plan.Setting(gpus=1, seq_len=400, batch_size=1, dtype="fp16")


def opt(size: str) -> plan.ModelShape:
    return plan.opt_shape(size)


@pytest.mark.parametrize("size", ["125m", "350m"])
def test_builtin_counts_equal_the_real_modules(size):
    """The table's formula counts what transformers builds for the same config (on meta)."""
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    h, n, ffn, vocab, heads = plan.OPT[size]
    extra = {"word_embed_proj_dim": 512, "do_layer_norm_before": False} if size == "350m" else {}
    config = OPTConfig(hidden_size=h, num_hidden_layers=n, ffn_dim=ffn, vocab_size=vocab, num_attention_heads=heads,
                       max_position_embeddings=2048, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    assert opt(size).params == sum(p.numel() for p in model.parameters())
    assert opt(size).block_params == sum(p.numel() for p in model.model.decoder.layers[0].parameters())
    if size == "125m":
        assert opt(size).params == 125_239_296  # OPT-125m's published count


def test_paper_headline_one_80gb_gpu():
    for backend in ("single", "fsdp", "zero3"):
        assert plan.fits(opt("2.7b"), "adam_full", backend, PAPER, A100)
        assert not plan.fits(opt("6.7b"), "adam_full", backend, PAPER, A100)
        assert plan.fits(opt("30b"), "mezo", backend, PAPER, A100)
        assert not plan.fits(opt("66b"), "mezo", backend, PAPER, A100)
    # Backprop's limit is its 16 bytes per parameter, MeZO's is the weights themselves.
    e = plan.estimate(opt("2.7b"), "adam_full", "single", PAPER)
    assert e.optimizer + e.gradients + e.parameters == 16 * opt("2.7b").params
    m = plan.estimate(opt("30b"), "mezo", "single", PAPER)
    assert m.optimizer == m.gradients == 0 and m.parameters == 2 * opt("30b").params


def test_paper_headline_66b_on_two_gpus():
    two = plan.Setting(gpus=2, seq_len=400, batch_size=1, dtype="fp16")
    for backend in ("fsdp", "zero3"):
        assert plan.fits(opt("66b"), "mezo", backend, two, A100)
        assert plan.min_gpus(opt("66b"), "mezo", backend, PAPER, A100) == 2
    assert not plan.fits(opt("66b"), "mezo", "single", two, A100), "replicas do not shrink"
    assert plan.min_gpus(opt("66b"), "mezo", "single", PAPER, A100) is None
    # Offloading parameters to host memory leaves only the gathered layers and the persistent
    # parameters (biases and norms, 0.01% of OPT-66B) on the device.
    off = plan.estimate(opt("66b"), "mezo", "zero3_offload", PAPER)
    assert off.parameters == 2 * plan.persistent_numel(opt("66b")) < 1e-3 * 2 * opt("66b").params
    assert off.host == 2 * opt("66b").params and off.total < A100


def test_peft_and_sharding_terms():
    big = opt("13b")
    lora = plan.estimate(big, "adam_lora", "single", PAPER)
    full = plan.estimate(big, "adam_full", "single", PAPER)
    assert lora.optimizer < full.optimizer / 1000 and lora.activations == full.activations
    four = plan.Setting(gpus=4, seq_len=400, batch_size=1, dtype="fp16")
    sharded = plan.estimate(big, "adam_full", "zero3", four)
    # Every OPT-13B tensor splits evenly in 4; ZeRO-3 also keeps the persistent parameters whole.
    persistent = 2 * plan.persistent_numel(big)
    assert sharded.parameters - persistent == full.parameters // 4 and sharded.optimizer == full.optimizer // 4
    assert plan.estimate(big, "mezo_prefix", "single", PAPER).activations > plan.estimate(big, "mezo", "single", PAPER).activations
    fp32 = plan.Setting(gpus=1, seq_len=400, batch_size=1, dtype="fp32")
    e = plan.estimate(big, "adam_full", "single", fp32)
    assert e.parameters + e.gradients + e.optimizer == 16 * big.params  # 4 + 4 + two 4-byte moments


def test_local_folder_is_counted_exactly(tiny_models):
    from transformers import AutoModelForCausalLM

    for arch, folder in tiny_models.items():
        shape = plan.resolve_model(str(folder))
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert shape.params == sum(p.numel() for p in model.parameters()), arch
        assert 0 < shape.block_params < shape.params and shape.layers == 2


def test_cli_prints_every_method_and_backend(capsys):
    assert plan.main(["--model_name_or_path", "facebook/opt-13b", "--gpus", "2", "--gpu_memory_gb", "80"]) == 0
    out = capsys.readouterr().out
    for method in plan.METHODS:
        for backend in plan.BACKENDS:
            assert any(line.split()[:2] == [method, backend] for line in out.splitlines()), (method, backend)


BAD = [
    (["--model_name_or_path", "opt-9000b"], r"unknown model 'opt-9000b': not a built-in OPT size"),
    (["--model_name_or_path", "opt-13b", "--dtype", "int3"], r"unknown --dtype 'int3'"),
    (["--model_name_or_path", "opt-13b", "--gpus", "0"], r"--gpus must be >= 1"),
    (["--gpus", "2"], r"the following arguments are required: --model_name_or_path"),
]


@pytest.mark.parametrize("argv,pattern", BAD, ids=["unknown model", "dtype", "gpus", "no model"])
def test_bad_input_one_line_exit_2(argv, pattern):
    import re

    p = subprocess.run([sys.executable, "-m", "mezo_dist.plan", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(err) == 1 and err[0].startswith("mezo_dist: error: ") and re.search(pattern, err[0]), err
    assert "Traceback" not in p.stderr and p.stdout == ""
