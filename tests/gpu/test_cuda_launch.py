"""On a CUDA device (skipped without one; benchmarks/gpu_check.sh runs them): the launch path
with NCCL and the fused kernels, on one GPU."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import launch

pytestmark = pytest.mark.gpu

COMMON = ["--max_steps", "4", "--max_length", "32", "--learning_rate", "1e-3", "--zo_eps", "1e-3", "--seed", "7",
          "--per_device_train_batch_size", "4", "--disable_tqdm", "--report_to", "none"]


def sentences(tmp_path):
    # The GPU machine has no copy of the task data beside the checkout: a few sentences of its own.
    path = tmp_path / "text.jsonl"
    words = "a gripping funny and humane film that never quite finds its footing".split()
    path.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(len(words))))
    return path


@pytest.mark.parametrize("backend", ["single", "fsdp"])
def test_training_runs_on_one_gpu(backend, tiny_models, tmp_path):
    out = tmp_path / "out"
    text_file = sentences(tmp_path)
    launch("python", "launch/train.py", ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
                                         "--output_dir", str(out), "--backend", backend, "--precision", "bf16", *COMMON],
           CUDA_VISIBLE_DEVICES="0")
    rows = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["projected_grad"]) for r in rows)
    assert (out / "final" / "config.json").is_file()


def test_a_gpu_run_replays_on_the_cpu(tiny_models, tmp_path):
    """The hash stream draws the same z on CUDA and on CPU, so the seed log of a GPU run rebuilds
    its weights on a CPU (the passes are IEEE-exact adds and multiplies on both)."""
    from safetensors.torch import load_file

    out, rebuilt = tmp_path / "out", tmp_path / "rebuilt"
    model = str(tiny_models["opt"])
    launch("python", "launch/train.py", ["--model_name_or_path", model, "--train_file", str(sentences(tmp_path)),
                                         "--output_dir", str(out), "--backend", "single", *COMMON],
           CUDA_VISIBLE_DEVICES="0")
    assert json.loads((out / "trajectory.jsonl").read_text().splitlines()[0])["noise"] == "hash"
    launch("python", "launch/replay.py", ["--model_name_or_path", model, "--trajectory", str(out / "trajectory.jsonl"),
                                          "--output_dir", str(rebuilt)], CUDA_VISIBLE_DEVICES="")
    trained, replayed = load_file(out / "final" / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    worst = max((trained[k].float() - replayed[k].float()).abs().max().item() for k in trained)
    print(f"largest difference between the GPU run and its CPU replay: {worst:.3g}")
    assert worst <= 1e-6
