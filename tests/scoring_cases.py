"""Samples of every task for the scoring tests: real rows where the data folder has them, rows
written by hand in the official release schema for ReCoRD and DROP (no local copy of either)."""

from __future__ import annotations

from pathlib import Path

from mezo_dist.tasks import get_task
from mezo_dist.tasks.base import Sample

# Every task with local data, by the split its evaluation draws from.
REAL_TASKS = ("SST2", "SST5", "TREC", "SNLI", "MNLI", "RTE", "CB", "BoolQ", "WSC", "WIC", "MultiRC", "Copa", "SQuAD")
# Tasks whose default prompts' candidates are one token each after a shared prefix under SmolLM2's
# tokenizer (SNLI and MNLI only with the "question" template: the paper's puts the hypothesis
# into every candidate).
SINGLE_TOKEN = {"SST2", "SST5", "TREC", "RTE", "CB", "BoolQ", "WSC", "WIC", "MultiRC", "SNLI/question",
                "MNLI/question"}


def _record_row(text: str, entities: list[str], qas: list[tuple[str, str, list[str]]]) -> dict:
    """A ReCoRD release row: entity spans as inclusive character offsets into the passage."""
    def span(e: str) -> dict:
        start = text.index(e)
        return {"start": start, "end": start + len(e) - 1}

    return {"passage": {"text": text, "entities": [span(e) for e in entities]},
            "qas": [{"id": qid, "query": query, "answers": [{**span(a), "text": a} for a in answers]}
                    for qid, query, answers in qas]}


RECORD_ROWS = [
    _record_row(
        "The city council of Springfield voted on Tuesday to build a new bridge over the Fox River, "
        "Mayor Ellen Park said.\n@highlight\nSpringfield approves bridge\n@highlight\nWork starts in May",
        ["Springfield", "Fox River", "Ellen Park"],
        [("r1", "@placeholder expects the bridge to open within two years.", ["Ellen Park"]),
         ("r2", "Boats on the @placeholder will be diverted during construction.", ["Fox River"])],
    ),
    _record_row(
        "Researchers at Northfield University found a new species of frog in the Andes, the team "
        "reported in Nature.\n@highlight\nThe frog is smaller than a coin",
        ["Northfield University", "Andes", "Nature"],
        [("r3", "The study in @placeholder describes the frog's call.", ["Nature"])],
    ),
]


def _drop_answer(number: str = "", spans: list[str] | None = None, date: dict | None = None) -> dict:
    return {"number": number, "date": date or {"day": "", "month": "", "year": ""}, "spans": spans or []}


DROP_ROWS = [
    {"passage": "The Bears scored two touchdowns in the first quarter and a field goal in the third. "
                "The Lions answered with one touchdown in the fourth quarter.",
     "qa_pairs": [
         {"query_id": "d1", "question": "How many touchdowns did the Bears score?", "answer": _drop_answer("2"),
          "validated_answers": [_drop_answer(spans=["two"])]},
         {"query_id": "d2", "question": "Which team scored in the fourth quarter?",
          "answer": _drop_answer(spans=["Lions"]), "validated_answers": []},
     ]},
    {"passage": "The treaty was signed on 4 March 1801 and came into force a year later.",
     "qa_pairs": [{"query_id": "d3", "question": "When was the treaty signed?",
                   "answer": _drop_answer(date={"day": "4", "month": "March", "year": "1801"})}]},
]


def task_samples(name: str, data_dir: Path | str, n: int = 8) -> list[Sample]:
    """The first ``n`` samples of task ``name`` (``"SNLI/question"`` names a template)."""
    task_name, _, template = name.partition("/")
    task = get_task(task_name)
    if task.name == "ReCoRD":
        rows = [r for row in RECORD_ROWS for r in task.expand(row)]
    elif task.name == "DROP":
        rows = [r for row in DROP_ROWS for r in task.expand(row)]
    else:
        rows = task.load(task.eval_split, data_dir=data_dir)[:n]
    return [task.build(r, template or None) for r in rows[:n]]
