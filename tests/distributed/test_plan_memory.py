"""The capacity planner against memory measured in real MeZO runs (launch/train.py, CPU, gloo).

What is compared, honestly: on CPU the figure a run reports (``peak_memory_bytes_per_rank`` in
``train_results.json``) is the process's resident-set high-water mark, which includes the Python,
torch and transformers runtime (400 to 500 MB here). That runtime is measured, not guessed: the same
command on a model of a few thousand parameters gives it (its own small predicted model part
subtracted). The planner's *model-dependent part* (parameters, gathered blocks, the forward's
working set without a key/value cache, the noise buffer) is then compared with the measured peak minus
that runtime, for a random-weight OPT of 43M parameters (170 MB in fp32) at micro-batch 8 x 128
tokens, within 15%; and the planner's total with ``runtime_overhead`` set to the measured runtime
is compared with the measured total, within 15% (an easier check, since the runtime is shared).

The measured window: with ``--logging_steps 2 --max_steps 3`` the reported peak covers step 3 only
(two forwards and three passes over the parameters), after loading is over. glibc's mmap threshold
is pinned (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mezo_dist import plan
from tests.helpers import launch

SEQ, MICRO = 128, 8
MID = {"hidden": 768, "layers": 6, "ffn": 3072}


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    from mezo_dist.testing import make_tiny_model

    mid = make_tiny_model(tmp_path_factory.mktemp("plan_models") / "opt_mid", "opt", **MID)
    return {"tiny": tiny_models["opt"], "mid": mid}


@pytest.fixture(scope="module")
def long_text(tmp_path_factory) -> Path:
    # Every text is longer than SEQ characters (the tokenizer is character-level), so every batch
    # is exactly MICRO x SEQ and the prediction's shape is the run's shape.
    path = tmp_path_factory.mktemp("plan_data") / "long.jsonl"
    path.write_text("".join(json.dumps({"text": f"a gripping, funny and humane film, take {i}. " * 6}) + "\n"
                            for i in range(64)))
    return path


def measured_peak(launcher: str, backend: str, model: Path, text: Path, out: Path) -> int:
    args = ["--model_name_or_path", str(model), "--train_file", str(text), "--output_dir", str(out),
            "--backend", backend, "--max_steps", "3", "--logging_steps", "2", "--max_length", str(SEQ),
            "--per_device_train_batch_size", str(MICRO), "--disable_tqdm", "--report_to", "none"]
    launch(launcher, "launch/train.py", args, timeout=300, MALLOC_MMAP_THRESHOLD_="65536")
    return max(json.loads((out / "train_results.json").read_text())["peak_memory_bytes_per_rank"])


@pytest.mark.parametrize("launcher,backend,world", [("python", "single", 1), ("torchrun", "fsdp", 2)])
def test_planner_predicts_measured_peak(launcher, backend, world, models, long_text, tmp_path):
    setting = plan.Setting(gpus=world, seq_len=SEQ, batch_size=MICRO, dtype="fp32")
    predicted = {k: plan.estimate(plan.resolve_model(str(m)), "mezo", backend, setting) for k, m in models.items()}
    measured = {k: measured_peak(launcher, backend, m, long_text, tmp_path / k) for k, m in models.items()}

    runtime = measured["tiny"] - predicted["tiny"].total
    model_measured = measured["mid"] - runtime
    model_predicted = predicted["mid"].total
    with_runtime = plan.estimate(plan.resolve_model(str(models["mid"])), "mezo", backend,
                                 plan.Setting(gpus=world, seq_len=SEQ, batch_size=MICRO, dtype="fp32",
                                              runtime_overhead_bytes=runtime))
    mib = 2**20
    print(f"\n{backend} x{world}: runtime {runtime / mib:.1f} MiB; model part predicted {model_predicted / mib:.1f} MiB "
          f"vs measured {model_measured / mib:.1f} MiB; total predicted {with_runtime.total / mib:.1f} MiB vs measured "
          f"{measured['mid'] / mib:.1f} MiB")
    assert 100 * mib < runtime < 2000 * mib, "the runtime baseline is not what a Python/torch process costs"
    weights = predicted["mid"].parameters + predicted["mid"].gathered
    assert weights > 0.5 * model_predicted, "the weights must dominate the model part"
    assert abs(model_predicted - model_measured) <= 0.15 * model_measured, (model_predicted, model_measured)
    assert abs(with_runtime.total - measured["mid"]) <= 0.15 * measured["mid"]
