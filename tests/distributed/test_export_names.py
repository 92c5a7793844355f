"""Exports keep the model's own tensor names under every backend: the safetensors of an export
hold the keys, and the values, that the model's own ``save_pretrained`` writes. GPT-NeoX is the
case that needs care (``embed_out`` on disk, ``lm_head`` in memory); Llama's tied embeddings are
saved once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

ARCHS = ("gpt_neox", "llama")


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


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, from its one file or from the files its index names."""
    import json

    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        out.update(load_file(str(folder / name)))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from mezo_dist.testing import make_tiny_model

    root = tmp_path_factory.mktemp("export_models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def own_saves(models, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """What each model's own ``from_pretrained`` -> ``save_pretrained`` writes."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("own_saves")
    saved = {}
    for arch, folder in models.items():
        AutoModelForCausalLM.from_pretrained(folder).save_pretrained(root / arch)
        saved[arch] = tensors(root / arch)
    assert "embed_out.weight" in saved["gpt_neox"] and "lm_head.weight" not in saved["gpt_neox"]
    return saved


@pytest.mark.parametrize("backend", ["single", "fsdp", "zero3"])
def test_exports_write_the_names_and_values_of_save_pretrained(backend, rank_pool, models, own_saves, tmp_path):
    rank_pool.run(export_all, backend, {arch: str(folder) for arch, folder in models.items()}, str(tmp_path))
    for arch in ARCHS:
        got, want = tensors(tmp_path / arch), own_saves[arch]
        assert sorted(got) == sorted(want), f"{backend} {arch}: {sorted(set(got) ^ set(want))}"
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{backend} {arch}: {key}"
