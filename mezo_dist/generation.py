"""Greedy decoding for the generation tasks (SQuAD, DROP): batched, with a key/value cache.

Prompts are left-padded, so every row's next token is read at the last position, and given
position ids that number each row's real tokens from 0, as if it stood alone. The first forward
reads the prompts and fills a ``DynamicCache``; every later one feeds one token per row. A row
that is done keeps being fed padding (masked out) until every row of its batch is done, so a
batch makes as many forwards as its longest answer needs. Each row stops as decoding one context
alone does: at EOS, at ``max_new_tokens``, or where its decoded text first contains the stop
string (the text is cut there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mezo_dist.encoding import pad_id, prompt_ids
from mezo_dist.errors import ConfigError
from mezo_dist.logits import Forward, kept_logits


def supports_kv_cache(model: nn.Module) -> bool:
    """Whether decoding may pass ``model`` a cache of its own. Not for peft's prompt learning
    (prefix tuning): its forward puts the prefix in place of any cache it is given."""
    config = getattr(model, "active_peft_config", None)
    return not bool(getattr(config, "is_prompt_learning", False))


def _decode(forward: Forward, tokenizer, prompts: list[list[int]], *, device, max_new_tokens: int,
            stop: str | None, use_cache: bool) -> list[tuple[list[int], str]]:
    """Greedy continuation of a batch of prompts: (kept token ids, text cut before the stop string)."""
    from transformers import DynamicCache

    n, width = len(prompts), max(len(p) for p in prompts)
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    seq = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        seq[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    cache = DynamicCache() if use_cache else None
    x, pos = seq, (mask.cumsum(1) - 1).clamp(min=0)
    new: list[list[int]] = [[] for _ in prompts]
    texts = [""] * n
    active = [True] * n
    for step in range(max_new_tokens):
        extra = {"position_ids": pos.to(device), "use_cache": cache is not None}
        if cache is not None:
            extra["cache"] = cache
        nxt = kept_logits(forward, x.to(device), mask.to(device), 1, **extra)[:, -1].float().argmax(-1).tolist()
        if cache is not None and step == 0 and cache.get_seq_length() != width:
            cache = None  # the model kept no keys and values in it: read the whole sequence each step
        for i, tok in enumerate(nxt):
            if not active[i]:
                continue
            if eos is not None and tok == eos:
                active[i] = False
                continue
            text = tokenizer.decode(new[i] + [tok], skip_special_tokens=True)
            if stop and stop in text:
                # The token that brings the stop string is not kept, but the text before it is.
                texts[i], active[i] = text[:text.index(stop)], False
                continue
            new[i].append(tok)
            texts[i] = text
        if not any(active) or step == max_new_tokens - 1:
            break
        live = torch.tensor(active, dtype=torch.long)[:, None]
        column = torch.where(live.bool(), torch.tensor(nxt)[:, None], pad)
        seq, mask = torch.cat([seq, column], 1), torch.cat([mask, live], 1)
        full_pos = (mask.cumsum(1) - 1).clamp(min=0)
        x, pos = (column, full_pos[:, -1:]) if cache is not None else (seq, full_pos)
    return list(zip(new, texts))


def greedy_continuations(forward: Forward, tokenizer, contexts: Sequence[str], *, device: torch.device | str,
                         max_new_tokens: int = 50, stop: str | None = "\n", max_length: int | None = None,
                         batch_size: int | None = 8, use_cache: bool | None = None,
                         masked_lm: bool = False) -> list[tuple[list[int], str]]:
    """Per context: the kept token ids and the text before the stop string (not stripped).
    Arguments as in :func:`greedy_generate`."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    # Every prompt is encoded (and refused) before the first forward.
    prompts = [prompt_ids(tokenizer, c, max_new_tokens=max_new_tokens, max_length=max_length, masked_lm=masked_lm)
               for c in contexts]
    if max_new_tokens < 1:
        return [([], "") for _ in contexts]
    if use_cache is None:
        use_cache = supports_kv_cache(forward) if isinstance(forward, nn.Module) else True
    # Batches of similar lengths waste less on padding; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    bs = len(order) if batch_size is None else batch_size
    out: list[tuple[list[int], str]] = [([], "")] * len(prompts)
    with torch.no_grad():
        for lo in range(0, len(order), bs):
            chunk = order[lo:lo + bs]
            got = _decode(forward, tokenizer, [prompts[i] for i in chunk], device=device,
                          max_new_tokens=max_new_tokens, stop=stop, use_cache=use_cache)
            for i, g in zip(chunk, got):
                out[i] = g
    return out


def greedy_generate_ids(forward: Forward, tokenizer, contexts: Sequence[str], *, device: torch.device | str,
                        max_new_tokens: int = 50, stop: str | None = "\n", max_length: int | None = None,
                        batch_size: int | None = 8, use_cache: bool | None = None,
                        masked_lm: bool = False) -> list[list[int]]:
    """Token ids that :func:`greedy_generate` keeps for each context (the stop token excluded)."""
    return [ids for ids, _ in greedy_continuations(forward, tokenizer, contexts, device=device,
                                                   max_new_tokens=max_new_tokens, stop=stop, max_length=max_length,
                                                   batch_size=batch_size, use_cache=use_cache, masked_lm=masked_lm)]


def greedy_generate(forward: Forward, tokenizer, contexts: Sequence[str], *, device: torch.device | str,
                    max_new_tokens: int = 50, stop: str | None = "\n", max_length: int | None = None,
                    batch_size: int | None = 8, use_cache: bool | None = None,
                    masked_lm: bool = False) -> list[str]:
    """Greedy continuation of each context, whitespace-stripped.

    Args:
        forward: the causal LM, or a placement's forward (a :class:`~mezo_dist.evaluate.BalancedForward`
            under a sharded engine, whose ranks make different numbers of calls).
        max_new_tokens: most tokens generated per context.
        stop: decoding of a context ends where its text first contains this string (cut there).
        max_length: prompts are cut from the left (keeping BOS) to ``max_length - max_new_tokens``.
        batch_size: contexts decoded together; None decodes all at once.
        use_cache: keep keys and values between steps; None decides from the model when
            ``forward`` is one (see :func:`supports_kv_cache`), else True.
        masked_lm: the model is a masked LM, which cannot generate: refused in one line.
    """
    return [text.strip() for _, text in greedy_continuations(forward, tokenizer, contexts, device=device,
                                                             max_new_tokens=max_new_tokens, stop=stop,
                                                             max_length=max_length, batch_size=batch_size,
                                                             use_cache=use_cache, masked_lm=masked_lm)]
