"""Exports keep the model's own tensor names under every backend: the safetensors of an export
hold the keys, and the values, that the model's own ``save_pretrained`` writes. GPT-NeoX is the
case that needs care (``embed_out`` on disk, ``lm_head`` in memory); Llama's tied embeddings are
saved once, and so are RoBERTa's (its masked-LM head's decoder is tied to the word embeddings);
OPT is the model the cluster recipe trains.

After MeZO steps the sharded exports hold the same keys and dtypes as the ``single`` export of
the same run and values within 1e-5 (not bit for bit: the loss is summed over ranks in another
order than in one process, as in tests/distributed/test_equivalence.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, assert_same_export, export_files, launch

ARCHS = ("gpt_neox", "llama", "opt", "roberta")
BACKENDS = ("single", "fsdp", "zero3")


def export_all(state, backend: str, models: dict[str, str], out: str) -> None:
    """Place each model on ``backend`` and export it to ``out/<arch>`` (collective)."""
    from mezo_dist.config import ModelArguments
    from mezo_dist.export import save_pretrained
    from mezo_dist.placement.build import build_placement

    ds_config = str(ROOT / "ds_configs" / "zero3.json") if backend == "zero3" else None
    for arch, folder in models.items():
        placement = build_placement(ModelArguments(model_name_or_path=folder), state, backend=backend,
                                    ds_config=ds_config, micro_batch=1)
        save_pretrained(placement, None, Path(out) / arch)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from mezo_dist.testing import make_tiny_model

    root = tmp_path_factory.mktemp("export_models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def own_saves(models, tmp_path_factory) -> dict[str, Path]:
    """What each model's own ``from_pretrained`` -> ``save_pretrained`` writes."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    root = tmp_path_factory.mktemp("own_saves")
    for arch, folder in models.items():
        auto = AutoModelForMaskedLM if arch == "roberta" else AutoModelForCausalLM
        auto.from_pretrained(folder).save_pretrained(root / arch)
    names = export_files(root / "gpt_neox")
    assert "embed_out.weight" in names and "lm_head.weight" not in names
    return {arch: root / arch for arch in ARCHS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_exports_write_the_names_and_values_of_save_pretrained(backend, rank_pool, models, own_saves, tmp_path):
    rank_pool.run(export_all, backend, {arch: str(folder) for arch, folder in models.items()}, str(tmp_path))
    for arch in ARCHS:
        assert_same_export(tmp_path / arch, own_saves[arch], what=f"{backend} {arch}")


def train(backend: str, arch: str, model: Path, out: Path, data: dict[str, Path]) -> Path:
    """Two MeZO steps of global batch 4 on ``backend`` (2 ranks of 2, or one process of 4), then
    ``final/``; a causal LM on text, RoBERTa on SST-2 as a masked LM."""
    args = ["--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", "2", "--max_length", "32",
            "--learning_rate", "1e-2", "--zo_eps", "1e-3", "--seed", "5", "--disable_tqdm", "--report_to", "none",
            "--per_device_train_batch_size", "4" if backend == "single" else "2"]
    if arch == "roberta":
        args += ["--task_name", "SST2", "--template", "paper", "--data_dir", str(data["tasks"]), "--num_train", "8",
                 "--num_dev", "4", "--num_eval", "4", "--train_as_classification", "--max_length", "96"]
    else:
        args += ["--train_file", str(data["text"])]
    if backend == "zero3":
        args += ["--ds_config", "ds_configs/zero3.json"]
    elif backend == "fsdp":
        args += ["--backend", "fsdp"]
    launch("one" if backend == "single" else "ranks", "launch/train.py", args)
    return out / "final"


@pytest.mark.parametrize("arch", ["opt", "roberta"])
def test_trained_sharded_exports_match_the_single_export(arch, models, real_data, text_file, tmp_path):
    data = {"tasks": real_data, "text": text_file}
    finals = {b: export_files(train(b, arch, models[arch], tmp_path / b, data)) for b in BACKENDS}
    want, start = finals["single"], export_files(models[arch])
    moved = max((_tensor(want, k) - _tensor(start, k)).abs().max().item() for k in want)
    assert moved > 1e-4, "MeZO did not move the model"
    for backend in ("fsdp", "zero3"):
        got = finals[backend]
        assert sorted(got) == sorted(want), f"{backend} {arch}: {sorted(set(got) ^ set(want))}"
        worst = 0.0
        for key in want:
            a, b = _tensor(got, key), _tensor(want, key)
            assert a.dtype == b.dtype and a.shape == b.shape, f"{backend} {arch}: {key}"
            worst = max(worst, (a - b).abs().max().item() if a.numel() else 0.0)
        assert worst <= 1e-5, f"{backend} {arch}: exports differ by {worst}"


def _tensor(files: dict[str, Path], key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(files[key]), framework="pt") as f:
        return f.get_tensor(key)
