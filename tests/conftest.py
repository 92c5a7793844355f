"""Shared fixtures: real task data, tiny random-weight models, and real launchers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import data_dir  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` need a CUDA device: skipped with the reason where there is none
    (``benchmarks/gpu_check.sh`` runs them on a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def torch_extensions_dir(tmp_path_factory) -> Path:
    """A build folder of this session's own for the ops DeepSpeed compiles at first use (its CPU
    communication op, DeepSpeedCPUAdam). torch guards a build with a lock file that a killed build
    leaves behind, and every later run on the shared folder would then wait on it forever; a
    fresh folder costs one compile per session (about two minutes on 2 cores). A folder the user
    set through TORCH_EXTENSIONS_DIR is kept."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


@pytest.fixture(scope="session")
def real_data() -> Path:
    d = data_dir()
    if not (d / "sst2" / "train.jsonl").is_file():
        msg = f"real task data not found at {d} (set MEZO_DIST_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def text_file(real_data: Path, tmp_path_factory) -> Path:
    """SST-2 training sentences as a causal-LM text file (the first 96)."""
    out = tmp_path_factory.mktemp("data") / "sst2_text.jsonl"
    with open(real_data / "sst2" / "train.jsonl", encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i == 96:
                break
            dst.write(json.dumps({"text": json.loads(line)["sentence"].strip()}) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from mezo_dist.testing import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("opt", "llama", "roberta")}


@pytest.fixture(scope="session")
def rank_pool(torch_extensions_dir):
    """Two ranks over gloo, started once for the session (see tests/rank_pool.py)."""
    from tests.rank_pool import shared_pool

    pool = shared_pool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def bpe_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight models with the default model's own tokenizer (49,152 tokens), under
    which the paper's verbalizers are single tokens: a causal LM (weights drawn wider than the
    default, so that greedy decoding wanders over the vocabulary) and a masked LM."""
    from mezo_dist.assets import default_model_dir
    from mezo_dist.errors import ConfigError
    from mezo_dist.testing import make_tiny_model

    try:
        default_model_dir()
    except ConfigError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("bpe_models")
    return {"llama": make_tiny_model(root / "llama", "llama", tokenizer="smollm2", init_std=0.2),
            "roberta": make_tiny_model(root / "roberta", "roberta", tokenizer="smollm2")}
