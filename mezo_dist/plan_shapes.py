"""Model shapes for the capacity planner: every parameter's shape, counted without downloading.

Built-in OPT sizes come from their dimensions; any other model is read from a local folder's
``config.json`` and built on the meta device, so every ``AutoModelForCausalLM`` is counted exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mezo_dist.errors import ConfigError

# OPT sizes (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models", Table 1), as in
# the hub's config.json files: hidden, layers, ffn, vocab, heads. All have 2048 positions. 175B's
# weights are not on the hub (granted on request); its shape is the paper's.
OPT = {
    "125m": (768, 12, 3072, 50272, 12),
    "350m": (1024, 24, 4096, 50272, 16),
    "1.3b": (2048, 24, 8192, 50272, 32),
    "2.7b": (2560, 32, 10240, 50272, 32),
    "6.7b": (4096, 32, 16384, 50272, 32),
    "13b": (5120, 40, 20480, 50272, 40),
    "30b": (7168, 48, 28672, 50272, 56),
    "66b": (9216, 64, 36864, 50272, 72),
    "175b": (12288, 96, 49152, 50272, 96),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int  # all parameters, tied ones once
    block_params: int  # the largest transformer block
    root_params: int  # everything outside the blocks (embeddings, final norm, untied head)
    largest_param: int  # the biggest single tensor (sizes MeZO's noise buffer)
    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    # Every parameter's shape with its multiplicity (tied ones once): how the engines shard them.
    tensors: tuple[tuple[tuple[int, ...], int], ...] = ()


def opt_shape(size: str) -> ModelShape:
    """Exact parameter counts and shapes of an OPT size, from its dimensions (OPTForCausalLM's modules)."""
    h, n, ffn, vocab, heads = OPT[size]
    embed = 512 if size == "350m" else h  # OPT-350m embeds in 512 dims and projects in and out
    # Per block: q, k, v, out projections with biases; fc1, fc2 with biases; two layer norms.
    block = [((h, h), 4), ((h,), 4), ((ffn, h), 1), ((ffn,), 1), ((h, ffn), 1), ((h,), 1), ((h,), 4)]
    # Tied token embedding / head, learned positions (2048 + an offset of 2); 350m projects in and
    # out and, post-norm, has no final layer norm.
    root = [((vocab, embed), 1), ((2048 + 2, h), 1)]
    root += [((h, embed), 1), ((embed, h), 1)] if size == "350m" else [((h,), 2)]
    tensors = _merge(root + [(s, c * n) for s, c in block])
    block_params, root_params = _count(block), _count(root)
    return ModelShape(f"facebook/opt-{size}", root_params + n * block_params, block_params, root_params,
                      max(math.prod(s) for s, _ in tensors), h, n, ffn, vocab, heads, tensors)


def _count(tensors: list[tuple[tuple[int, ...], int]]) -> int:
    return sum(math.prod(s) * c for s, c in tensors)


def _merge(tensors: list[tuple[tuple[int, ...], int]]) -> tuple[tuple[tuple[int, ...], int], ...]:
    counts: dict[tuple[int, ...], int] = {}
    for s, c in tensors:
        counts[s] = counts.get(s, 0) + c
    return tuple(sorted(counts.items()))


def builtin_name(name: str) -> str | None:
    key = name.lower().removeprefix("facebook/").removeprefix("opt-")
    return key if key in OPT else None


def shape_from_folder(name: str) -> ModelShape:
    """Read config.json (local folder, or the local hub cache; never the network) and count
    parameters on the meta device, so any ``AutoModelForCausalLM`` architecture is counted exactly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config.json of {name}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.tie_weights()
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    total = sum(p.numel() for p in model.parameters())  # tied parameters once
    tensors = _merge([(tuple(p.shape), 1) for p in model.parameters()])
    block_sizes = []
    for module in model.modules():
        if type(module).__name__ in blocks:
            block_sizes.append(sum(p.numel() for p in module.parameters()))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    return ModelShape(
        name=name, params=total, block_params=max(block_sizes, default=0), root_params=total - sum(block_sizes),
        largest_param=max(p.numel() for p in model.parameters()),
        hidden=hidden, layers=_first(text, "num_hidden_layers", "n_layer", "num_layers"),
        ffn=_first(text, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden) or 4 * hidden,
        vocab=_first(text, "vocab_size"), heads=_first(text, "num_attention_heads", "n_head"), tensors=tensors,
    )


def _first(config, *names: str, default: int | None = None) -> int:
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, int):
            return value
    if default is not None:
        return default
    raise ConfigError(f"config.json has none of {', '.join(names)}; cannot size the model")


def resolve_model(name: str) -> ModelShape:
    size = builtin_name(name)
    if size is not None:
        return opt_shape(size)
    p = Path(name).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"model folder {name} has no config.json")
    if not p.is_dir() and ("/" not in name or name.startswith((".", "/", "~"))):
        raise ConfigError(
            f"unknown model {name!r}: not a built-in OPT size ({', '.join('opt-' + s for s in OPT)}) "
            "and not a local folder with config.json"
        )
    return shape_from_folder(name)
