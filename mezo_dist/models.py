"""Loading models and tokenizers: a hub name or a local folder, any ``AutoModelForCausalLM`` or
``AutoModelForMaskedLM``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from mezo_dist.errors import ConfigError
from mezo_dist.io import inside

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(name_or_path: str) -> None:
    """Fail early on a local path that does not exist; a bare ``org/name`` is left to the hub."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise ConfigError(f"model folder {name_or_path} has no config.json")
        return
    is_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path) is not None and not name_or_path.startswith(".")
    if not is_hub_id:
        raise ConfigError(f"model path {name_or_path} does not exist")


def check_model_folder(name_or_path: str, *, trust_remote_code: bool = False):
    """Read a local model folder the way loading will, before anything is built: its config
    through ``AutoConfig`` (an unknown ``model_type`` is refused here), its JSON files, and the
    header of every safetensors file against the file's size (a truncated or corrupt file). The
    files a weight index names must lie inside the folder. Returns the config (None for a hub id
    that is not a local folder: loading reports what the hub says)."""
    folder = Path(name_or_path).expanduser()
    check_model_path(name_or_path)
    if not folder.is_dir():
        return None
    where = f"model folder {name_or_path}"
    for f in sorted(folder.glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{where}: {f.name} is not readable JSON ({e})") from None
    try:
        config = load_config(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers' reasons (unknown model_type, remote code) in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: config.json is not a model transformers can build: {first}") from None
    for f in _weight_files(folder, where):
        check_safetensors_header(f, what=where)
    return config


def _weight_files(folder: Path, where: str) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return sorted(folder.glob("*.safetensors"))
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{where}: {index.name} has no weight_map object")
    files = []
    for name in sorted(set(weight_map.values())):
        f = inside(folder, name, what=f"{where}: {index.name}")
        if not f.is_file():
            raise ConfigError(f"{where}: {index.name} names {name}, which is missing")
        files.append(f)
    return files


# Bytes per element of the safetensors dtypes (others are left to the library to judge).
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors_header(path: Path, *, what: str) -> None:
    """A safetensors file whose header parses and whose tensors' byte ranges tile the rest of the
    file exactly (reads the header only)."""
    bad = f"{what}: {path.name} is truncated or corrupt"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size or n > 100 * 2**20:
            raise ConfigError(f"{bad} (header length {n} in a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"{bad} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{bad} (its header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            numel = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{bad} (tensor {key} has no shape or data_offsets)") from None
        width = _ST_SIZES.get(info.get("dtype"))
        if not 0 <= start <= stop or (width is not None and stop - start != numel * width):
            raise ConfigError(f"{bad} (tensor {key} has byte range {start}..{stop} for shape {info['shape']})")
        end = max(end, stop)
    if 8 + n + end != size:
        raise ConfigError(f"{bad} (its tensors need {8 + n + end} bytes, the file has {size})")


def max_positions(config) -> int | None:
    """How many tokens one sequence may hold: the position embeddings, less the offset by which
    RoBERTa-style models start their positions (after the padding index)."""
    n = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
              if isinstance(getattr(config, k, None), int)), None)
    if n is not None and "roberta" in str(getattr(config, "model_type", "")):
        n -= int(getattr(config, "pad_token_id", None) or 0) + 1
    return n


def load_config(name_or_path: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def is_masked_lm(config) -> bool:
    """Whether the checkpoint is a masked LM (RoBERTa-style), scored at mask tokens."""
    return any(a.endswith("ForMaskedLM") for a in (getattr(config, "architectures", None) or []))


def auto_class(config):
    """``AutoModelForMaskedLM`` for masked LMs, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if is_masked_lm(config) else AutoModelForCausalLM


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padded positions are masked out anyway.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_pretrained(name_or_path: str, *, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The whole model on CPU (or under ``zero.Init`` when a ZeRO-3 config is active)."""
    cls = auto_class(load_config(name_or_path, trust_remote_code=trust_remote_code))
    return cls.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)


def empty_model(name_or_path: str, *, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model's structure with parameters on the meta device; buffers stay real.

    Buffers computed at construction (rotary frequencies) are not in the checkpoint, so they
    must not be left on meta.
    """
    from accelerate import init_empty_weights

    config = load_config(name_or_path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    # from_config leaves tied embeddings as two parameters; one parameter must carry both names
    # or the two copies would be perturbed apart.
    model.tie_weights()
    # from_pretrained hands out a model in eval mode, from_config one in train mode; a forward
    # before training (a prefix set from activations) must not run with dropout.
    return model.eval()


def apply_peft(model: nn.Module, args) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (``args.lora``) or a trainable prefix
    (``args.prefix_tuning``) through peft; the base weights are frozen.

    Initial values come from a forked RNG seeded by ``args.lora_init_seed`` or
    ``args.prefix_init_seed``, so every rank, and a later replay, starts from the same ones. A
    prefix is then set from real activations (see :func:`init_prefix_from_activations`); under
    ZeRO-3 the placement does that through its engine.
    """
    if getattr(args, "lora", False):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
            target_modules=[m.strip() for m in args.lora_target_modules.split(",") if m.strip()],
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.lora_init_seed)
            return get_peft_model(model, config)
    if getattr(args, "prefix_tuning", False):
        from peft import PrefixTuningConfig, get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.prefix_init_seed)
            model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_prefix))
        # peft also registers the input embedding at the root as ``word_embeddings``, a second name
        # for a module the base model holds. Prefix tuning never calls it, and sharding engines
        # trip over a module with two names (FSDP2 loads and gathers it under one of them only,
        # DeepSpeed hooks it twice). Keep the attribute, drop the registration.
        alias = model._modules.pop("word_embeddings", None)
        if alias is not None:
            object.__setattr__(model, "word_embeddings", alias)
        # Weights on meta (FSDP2's skeleton: rank 0's loaded copy gets the prefix) or partitioned
        # by ZeRO-3 (the engine sets the prefix once built) cannot run a forward here.
        at_hand = not any(p.is_meta or hasattr(p, "ds_id") for p in model.parameters())
        if args.prefix_init == "real" and at_hand:
            init_prefix_from_activations(model, args.prefix_init_seed)
        return model
    return model


apply_lora = apply_peft  # the name the placements used before prefix tuning


def prefix_embedding(model: nn.Module) -> nn.Parameter:
    """The trainable prefix of a peft prefix-tuning model: one row per virtual token, holding the
    key and value of every layer (layer-major, key before value)."""
    return model.prompt_encoder[model.active_adapter].embedding.weight


@torch.no_grad()
def prefix_activations(model: nn.Module, seed: int) -> torch.Tensor:
    """Keys and values of the base model on ``num_prefix`` random vocabulary tokens, laid out as
    peft's prefix rows. Collective under a sharded engine (it is a forward)."""
    base = model.get_base_model()
    if any(p.is_meta for p in base.parameters()):
        raise ValueError("the prefix cannot start from activations of a model on the meta device")
    n = model.peft_config[model.active_adapter].num_virtual_tokens
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, base.config.vocab_size, (1, n), generator=gen)
    device = next((p.device for p in base.parameters() if p.device.type != "meta"), torch.device("cpu"))
    # Called on peft's model with the prefix switched off (not on the base model inside it), so
    # that an engine wrapping the root (FSDP2) gathers the root's own parameters for the forward.
    with model.disable_adapter():
        cache = model(input_ids=ids.to(device), use_cache=True).past_key_values
    kv = [t[0] for layer in cache.layers for t in (layer.keys, layer.values)]  # each (heads, n, head_dim)
    return torch.stack(kv).permute(2, 0, 1, 3).reshape(n, -1)


def init_prefix_from_activations(model: nn.Module, seed: int) -> None:
    """Start the prefix from real activations: the MeZO paper found this crucial for prefix tuning
    with MeZO (a random prefix trains poorly)."""
    weight = prefix_embedding(model)
    values = prefix_activations(model, seed)
    if values.shape != weight.shape:
        raise ValueError(f"prefix activations of shape {tuple(values.shape)} do not fit peft's prefix {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(values.to(weight.dtype))
