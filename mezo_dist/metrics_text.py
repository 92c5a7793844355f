"""Task metrics on predictions: accuracy, and SQuAD-style exact match / token F1.

``normalize_answer``, ``exact_match`` and ``f1`` follow the definitions of the official SQuAD v1.1
evaluation script: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse
whitespace; F1 is over the bag of normalized tokens; both take the best score over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def accuracy(preds: Sequence[int], golds: Sequence[int]) -> float:
    """Fraction of positions where ``preds[i] == golds[i]``."""
    if len(preds) != len(golds):
        raise ValueError(f"accuracy needs as many predictions as gold labels ({len(preds)} != {len(golds)})")
    if not preds:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(int(p == g) for p, g in zip(preds, golds)) / len(preds)


def normalize_answer(text: str) -> str:
    """Lowercase, remove punctuation, remove articles, collapse whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers: str | Sequence[str]) -> list[str]:
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return golds


def exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals some normalized gold answer, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in _as_list(answers)))


def _f1_one(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    # As in the v1.1 script, no overlap (this includes an empty prediction) scores 0.
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str, answers: str | Sequence[str]) -> float:
    """Token-level F1 between the normalized prediction and the best-matching gold answer."""
    p = normalize_answer(pred).split()
    return max(_f1_one(p, normalize_answer(a).split()) for a in _as_list(answers))


def generation_scores(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean F1 and exact match of generated answers, each against its list of gold answers."""
    if len(preds) != len(answers):
        raise ValueError(f"need as many predictions as answer lists ({len(preds)} != {len(answers)})")
    if not preds:
        raise ValueError("scores of an empty set are undefined")
    n = len(preds)
    return {
        "f1": sum(f1(p, a) for p, a in zip(preds, answers)) / n,
        "exact_match": sum(exact_match(p, a) for p, a in zip(preds, answers)) / n,
    }
