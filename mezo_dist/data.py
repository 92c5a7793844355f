"""Training data for the causal-LM objective, and its split across ranks.

The order of examples depends on the run seed and the global batch size only, never on the
world size: step t takes the same global batch on 1 process or on N ranks, and rank r takes the
r-th contiguous slice of it. Every slice is padded to the longest example of the global batch,
so each rank's tensors have the shape one process would see, row for row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mezo_dist.errors import ConfigError
from mezo_dist.io import json_lines


def read_jsonl(path: str | Path, *, field: str = "text") -> list[str]:
    """Read a JSON Lines file whose every line is an object with a string ``field``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train file {path} does not exist")
    texts: list[str] = []
    for n, row in json_lines(p, what="train file"):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ConfigError(f'train file {path} line {n} has no string "{field}" field')
        check_encodable(row[field], where=f"train file {path} line {n}")
        texts.append(row[field])
    if not texts:
        raise ConfigError(f"train file {path} is empty")
    return texts


def check_encodable(value, *, where: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (JSON's "\\ud800" escapes decode to lone
    surrogates, which no tokenizer takes), anywhere inside ``value``."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end].encode("unicode_escape").decode()
        raise ConfigError(f"{where} holds a lone surrogate ({bad}), which is not text") from None


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: the data a checkpoint was trained on."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class TokenizedText:
    """Token ids of each example, truncated to ``max_length``."""

    ids: list[list[int]]
    pad_id: int

    @classmethod
    def build(cls, texts: list[str], tokenizer, max_length: int) -> "TokenizedText":
        ids = []
        for t in texts:
            x = tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            if len(x) >= 2:  # a single token gives no next-token target
                ids.append(list(x))
        if not ids:
            raise ConfigError("no training example has at least two tokens")
        return cls(ids=ids, pad_id=int(tokenizer.pad_token_id))

    def __len__(self) -> int:
        return len(self.ids)


class GlobalOrder:
    """Step t -> the indices of the t-th global batch, and this rank's contiguous slice of it.

    Examples are visited in a fresh seeded permutation each epoch; the order is a function of
    (seed, dataset size, global batch) only.
    """

    def __init__(self, size: int, *, micro_batch: int, rank: int, world_size: int, seed: int) -> None:
        self.size = size
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.global_batch = micro_batch * world_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            # A global batch spans at most two epochs; keep those two.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.size, generator=g).tolist()
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        n = self.size
        start = step * self.global_batch
        return [self._perm((start + i) // n)[(start + i) % n] for i in range(self.global_batch)]

    def local_indices(self, step: int) -> list[int]:
        return self.global_indices(step)[self.rank * self.micro_batch : (self.rank + 1) * self.micro_batch]


class TextBatches:
    """Step t -> this rank's slice of the t-th global batch of texts, as padded tensors."""

    def __init__(self, data: TokenizedText, *, micro_batch: int, rank: int, world_size: int, seed: int) -> None:
        self.data = data
        self.order = GlobalOrder(len(data), micro_batch=micro_batch, rank=rank, world_size=world_size, seed=seed)
        self.micro_batch = micro_batch
        self.rank = rank

    def batch(self, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """(this rank's tensors, number of tokens in the whole global batch)."""
        idx = self.order.global_indices(step)
        seqs = [self.data.ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        mine = seqs[self.rank * self.micro_batch : (self.rank + 1) * self.micro_batch]
        input_ids = torch.full((len(mine), width), self.data.pad_id, dtype=torch.long)
        mask = torch.zeros((len(mine), width), dtype=torch.long)
        for row, s in enumerate(mine):
            input_ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}, sum(len(s) for s in seqs)
