"""Generation tasks of the MeZO paper's OPT experiments: SQuAD (v1.1) and DROP.

The model continues the prompt after "Answer:"; the continuation up to the first newline is the
prediction, scored with SQuAD-style token F1 (and exact match) against every gold answer.
"""

from __future__ import annotations

from typing import Any

from mezo_dist.errors import ConfigError
from mezo_dist.tasks.base import Sample, Task, Template


def _unique(texts: list[str]) -> list[str]:
    # Annotators often give the same span several times; keep one copy, first-seen order.
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


# ----------------------------------------------------------------------------------------- SQuAD
def _squad_answers(row: dict[str, Any]) -> list[str]:
    answers = row.get("answers")
    if isinstance(answers, dict):  # hub/flat schema: {"text": [...], "answer_start": [...]}
        texts = list(answers.get("text", []))
    elif isinstance(answers, list):  # official v1.1 nesting: [{"text", "answer_start"}]
        texts = [a["text"] if isinstance(a, dict) else str(a) for a in answers]
    else:
        texts = []
    out = _unique(texts)
    if not out:
        raise ConfigError(f"task SQuAD: question {row.get('id', '?')} has no gold answer")
    return out


def _squad_paper(row: dict[str, Any]) -> Sample:
    # 'Title: <title>\nContext: <context>\nQuestion: <question>\nAnswer:'
    context = f'Title: {row["title"]}\nContext: {row["context"]}\nQuestion: {row["question"]}\nAnswer:'
    return Sample(context=context, candidates=[], gold=-1, answers=_squad_answers(row), row=row)


# ------------------------------------------------------------------------------------------ DROP
def _drop_answer_text(answer: dict[str, Any]) -> str:
    """One answer of the official DROP schema ({"number", "date": {day, month, year}, "spans"})."""
    if str(answer.get("number", "")).strip():
        return str(answer["number"]).strip()
    spans = [s for s in answer.get("spans", []) if s]
    if spans:
        # A multi-span answer needs all its spans; joining them keeps every word for the bag-of-words F1.
        return " ".join(spans)
    date = answer.get("date") or {}
    return " ".join(str(date.get(k, "")).strip() for k in ("month", "day", "year") if str(date.get(k, "")).strip())


def _drop_expand(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Official files nest the questions under each passage ({"passage", "qa_pairs": [...]});
    flatten to one row per question. Hub rows (answers_spans) are already flat."""
    if "qa_pairs" not in row:
        return [row]
    return [{"passage": row["passage"], **qa} for qa in row["qa_pairs"]]


def _drop_answers(row: dict[str, Any]) -> list[str]:
    texts: list[str] = []
    if isinstance(row.get("answers_spans"), dict):  # hub schema (ucinlp/drop)
        texts += list(row["answers_spans"].get("spans", []))
    if isinstance(row.get("answer"), dict):  # official schema
        texts.append(_drop_answer_text(row["answer"]))
    for extra in row.get("validated_answers") or []:
        if isinstance(extra, dict):
            texts.append(_drop_answer_text(extra))
    out = _unique(texts)
    if not out:
        raise ConfigError(f"task DROP: question {row.get('query_id', '?')} has no gold answer")
    return out


def _drop_paper(row: dict[str, Any]) -> Sample:
    # 'Passage: <passage>\nQuestion: <question>\nAnswer:'
    context = f'Passage: {row["passage"]}\nQuestion: {row["question"]}\nAnswer:'
    return Sample(context=context, candidates=[], gold=-1, answers=_drop_answers(row), row=row)


TASKS: list[Task] = [
    Task(name="SQuAD", kind="generation", metric="f1",
         templates={"paper": Template("paper", _squad_paper,
                                      "Title: <title>\\nContext: <context>\\nQuestion: <question>\\nAnswer:")},
         hub=("squad", None), splits={"train": "train", "validation": "validation"}, task_dir="squad"),
    Task(name="DROP", kind="generation", metric="f1",
         templates={"paper": Template("paper", _drop_paper, "Passage: <passage>\\nQuestion: <question>\\nAnswer:")},
         hub=("drop", None), splits={"train": "train", "validation": "validation"}, task_dir="drop",
         expand=_drop_expand),
]
