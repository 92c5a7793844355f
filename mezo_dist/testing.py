"""Small random-weight models with real architectures, for tests and benchmarks.

Dimensions are deliberately odd (not divisible by 2) so that shards and partitions have ragged
edges. The tokenizer is character-level, built without training, so it needs no download; or,
with ``tokenizer="smollm2"``, the default model's own (49,152 tokens), under which the paper's
verbalizers are single tokens.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def char_tokenizer(*, masked: bool = False):
    """Characters as tokens; ``masked`` adds a ``<mask>`` token and names ``<s>``/``</s>`` the
    cls/sep tokens, as a masked LM's tokenizer does."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + (["<mask>"] if masked else []))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    extra = {}
    if masked:
        tok.add_special_tokens([AddedToken("<mask>", special=True)])
        extra = {"mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
    )


def tiny_config(arch: str, *, vocab_size: int, hidden: int = 38, layers: int = 2, ffn: int = 53):
    from transformers import GPTNeoXConfig, LlamaConfig, OPTConfig, RobertaConfig

    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
            num_attention_heads=2, max_position_embeddings=256, word_embed_proj_dim=hidden,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, dropout=0.1, attention_dropout=0.1,
        )
    if arch == "llama":
        # head_dim must be even for rotary embeddings: hidden 42 = 3 heads x 14.
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=42, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        )
    if arch == "roberta":
        # A masked LM; positions start after the padding index, as RoBERTa's do.
        return RobertaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
            num_attention_heads=2, max_position_embeddings=256 + 2, pad_token_id=0, bos_token_id=2,
            eos_token_id=3, type_vocab_size=1,
        )
    if arch == "gpt_neox":
        # Its output layer is embed_out in checkpoints and lm_head in memory (transformers renames
        # it on load and back on save): exports must keep the checkpoint's name.
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}")


def smollm2_tokenizer(*, masked: bool = False):
    """The default model's tokenizer (from its cached folder); ``masked`` adds ``<pad>`` and
    ``<mask>`` tokens and names BOS/EOS the cls/sep tokens, as a masked LM's tokenizer does."""
    from transformers import AutoTokenizer

    from mezo_dist.assets import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    if masked:
        # RoBERTa numbers positions by skipping the pad id, so padding needs an id of its own
        # (not the [SEP] that closes every sequence), and a small one: it also indexes the
        # position table. The unknown token <|endoftext|> (id 0) serves.
        tok.add_special_tokens({"mask_token": "<mask>"})
        tok.pad_token, tok.cls_token, tok.sep_token = tok.unk_token, tok.bos_token, tok.eos_token
    return tok


def make_tiny_model(path: str | Path, arch: str = "opt", *, seed: int = 0, tokenizer: str = "char",
                    init_std: float | None = None, **dims) -> Path:
    """Save a random-weight causal LM (or, for ``roberta``, masked LM) and its tokenizer as a
    Hugging Face folder; ``tokenizer`` is ``"char"`` or ``"smollm2"``. ``init_std`` replaces the
    architecture's initial weight scale: larger weights make greedy decoding wander over the
    vocabulary instead of repeating one token."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    path = Path(path)
    masked = arch == "roberta"
    if tokenizer == "char":
        tok = char_tokenizer(masked=masked)
        # The vocabulary is odd on purpose: 99 tokens (100 with <mask>) + 2 unused rows.
        config = tiny_config(arch, vocab_size=len(tok) + 2, **dims)
    elif tokenizer == "smollm2":
        tok = smollm2_tokenizer(masked=masked)
        config = tiny_config(arch, vocab_size=len(tok), **dims)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(config, key, getattr(tok, key))
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose char or smollm2")
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    model = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
