"""Single-sentence and NLI classification: SST-2 (OPT experiments) and the LM-BFF tasks of the
paper's masked-LM experiments (SST-5, SNLI, MNLI, TREC).

The LM-BFF prompts (Gao et al. 2021, used by MeZO for RoBERTa-large) put a [MASK] somewhere in the
sentence. A causal LM scores left to right, so each prompt is cut right before the label word:
the context ends where [MASK] stood and each candidate starts with the label word. Anything the
pattern has after [MASK] (the NLI hypothesis) becomes part of every candidate, and so is scored.
"""

from __future__ import annotations

import string
from typing import Any

from mezo_dist.errors import ConfigError
from mezo_dist.tasks.base import Sample, Task, Template, choice_sample, first_field, int_label, label_index


def _sentence(row: dict[str, Any]) -> str:
    # GLUE SST-2 sentences end with a space; strip it so the prompt has single spaces.
    return str(first_field(row, "sentence", "text")).strip()


# ------------------------------------------------------------------------------------------ SST-2
def _sst2_paper(row: dict[str, Any]) -> Sample:
    # MeZO paper, OPT prompt for SST-2: "<S1> It was terrible/great".
    gold = int_label(row["label"], 2, task="SST2")
    return choice_sample(f"{_sentence(row)} It was", [" terrible", " great"], gold, row)


def _sst2_review(row: dict[str, Any]) -> Sample:
    # Not from the paper: a plainer prompt that small models follow much better zero-shot
    # (about 78% vs 50% for a 135M model), hence the SST2 default.
    return choice_sample(f"Review: {_sentence(row)}\nSentiment:", [" negative", " positive"],
                         int_label(row["label"], 2, task="SST2"), row)


# ------------------------------------------------------------------------------------------ SST-5
SST5_WORDS = [" terrible", " bad", " okay", " good", " great"]  # LM-BFF verbalizer, labels 0..4


def _sst5_paper(row: dict[str, Any]) -> Sample:
    # LM-BFF: "<S1> It was [MASK] ."
    return choice_sample(f"{_sentence(row)} It was", SST5_WORDS, int_label(row["label"], 5, task="SST5"), row)


# ------------------------------------------------------------------------------------ SNLI / MNLI
# Candidate order follows the label ids of the GLUE/SNLI hub copies (0 entailment, 1 neutral,
# 2 contradiction); the local files spell the label out in "gold_label".
NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
NLI_WORDS = ["Yes", "Maybe", "No"]  # LM-BFF verbalizer


def _nli_fields(row: dict[str, Any], task: str) -> tuple[str, str, int]:
    premise = first_field(row, "premise", "sentence1")
    hypothesis = first_field(row, "hypothesis", "sentence2")
    label = first_field(row, "label", "gold_label")
    return str(premise).strip(), str(hypothesis).strip(), label_index(label, NLI_LABELS, task=task)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _nli_paper(task: str):
    def build(row: dict[str, Any]) -> Sample:
        # LM-BFF: "<S1 without its final punctuation> ? [MASK] , <S2 with a lowercase first letter>".
        # The context stops at "?"; each candidate is "<word>, <hypothesis>", so the hypothesis is
        # scored given the label word (LM-BFF drops the last character unconditionally; we drop it
        # only when it is punctuation).
        premise, hypothesis, gold = _nli_fields(row, task)
        if premise and premise[-1] in string.punctuation:
            premise = premise[:-1].rstrip()
        cands = [f" {w}, {_lower_first(hypothesis)}" for w in NLI_WORDS]
        return choice_sample(f"{premise}?", cands, gold, row)

    return build


def _nli_question(task: str):
    def build(row: dict[str, Any]) -> Sample:
        # Alternative with the label word last, so only the label word is scored.
        premise, hypothesis, gold = _nli_fields(row, task)
        context = f'{premise}\nQuestion: does this imply "{hypothesis}"? Yes, Maybe or No?\nAnswer:'
        return choice_sample(context, [f" {w}" for w in NLI_WORDS], gold, row)

    return build


def _drop_unlabeled(row: dict[str, Any]) -> list[dict[str, Any]]:
    # SNLI on the hub marks pairs without annotator agreement with label -1 (the official files
    # with gold_label "-"); the paper's sets exclude them.
    # A row with no label field at all is malformed, not unlabeled.
    return [] if first_field(row, "label", "gold_label") in (-1, "-") else [row]


# ------------------------------------------------------------------------------------------- TREC
# Candidate i is the LM-BFF label word of label id i: 0 DESC, 1 ENTY, 2 ABBR, 3 HUM, 4 LOC, 5 NUM
# (the local files' "label"). The hub copy (CogComp/trec) numbers its "coarse_label" differently,
# so labels are mapped through the class name.
TREC_CLASSES = ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]
TREC_WORDS = [" Description", " Entity", " Expression", " Human", " Location", " Number"]
_TREC_HUB_NAMES = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]  # ClassLabel order of CogComp/trec


def _trec_label(row: dict[str, Any]) -> int:
    coarse = row.get("coarse_label")
    if isinstance(coarse, str) and coarse in TREC_CLASSES:
        return TREC_CLASSES.index(coarse)
    if isinstance(coarse, int) and not isinstance(coarse, bool) and 0 <= coarse < len(_TREC_HUB_NAMES):
        return TREC_CLASSES.index(_TREC_HUB_NAMES[coarse])
    if "label" in row:  # LM-BFF files without the class name
        return int_label(row["label"], len(TREC_CLASSES), task="TREC")
    raise ConfigError(f"task TREC: row has no usable coarse_label/label ({coarse!r})")


def _trec_paper(row: dict[str, Any]) -> Sample:
    # LM-BFF: "[MASK] : <S1>" puts the label word first, which a left-to-right scorer cannot
    # condition on the question; here the label word follows the question instead.
    return choice_sample(f"{str(row['text']).strip()}\nAnswer type:", TREC_WORDS, _trec_label(row), row)


# ------------------------------------------------------------------------------------------ tasks
def _t(name: str, fn, description: str) -> Template:
    return Template(name=name, build=fn, description=description)


SST2_TEMPLATES = {
    "paper": _t("paper", _sst2_paper, "<sentence> It was -> terrible/great"),
    "review": _t("review", _sst2_review, "Review: <sentence>\\nSentiment: -> negative/positive"),
}

TASKS: list[Task] = [
    # The embedded default: Pang & Lee sentence polarity (the corpus SST was built from), read
    # from the local cache that mezo_dist.assets builds; it has no hub copy.
    Task(
        name="Polarity", kind="classification", metric="accuracy", templates=SST2_TEMPLATES,
        default_template="review", hub=("", None),
        splits={"train": "train", "validation": "validation"}, task_dir="polarity",
    ),
    Task(
        name="SST2", kind="classification", metric="accuracy",
        templates=SST2_TEMPLATES, default_template="review", hub=("glue", "sst2"),
        splits={"train": "train", "validation": "validation"}, task_dir="sst2",
    ),
    Task(
        name="SST5", kind="classification", metric="accuracy",
        templates={"paper": _t("paper", _sst5_paper, "<sentence> It was -> terrible/bad/okay/good/great")},
        hub=("SetFit/sst5", None),
        # LM-BFF (and MeZO's RoBERTa runs) evaluate SST-5 on the original test set.
        splits={"train": "train", "validation": "validation", "test": "test"}, eval_split="test", task_dir="sst5",
    ),
    Task(
        name="SNLI", kind="classification", metric="accuracy",
        templates={
            "paper": _t("paper", _nli_paper("SNLI"), "<premise>? -> Yes/Maybe/No, <hypothesis>"),
            "question": _t("question", _nli_question("SNLI"),
                           '<premise>\\nQuestion: does this imply "<hypothesis>"? ...\\nAnswer: -> Yes/Maybe/No'),
        },
        hub=("snli", None), splits={"train": "train", "validation": "validation"}, task_dir="snli",
        expand=_drop_unlabeled,
    ),
    Task(
        name="MNLI", kind="classification", metric="accuracy",
        templates={
            "paper": _t("paper", _nli_paper("MNLI"), "<premise>? -> Yes/Maybe/No, <hypothesis>"),
            "question": _t("question", _nli_question("MNLI"),
                           '<premise>\\nQuestion: does this imply "<hypothesis>"? ...\\nAnswer: -> Yes/Maybe/No'),
        },
        hub=("glue", "mnli"), splits={"train": "train", "validation": "validation_matched"}, task_dir="mnli",
        expand=_drop_unlabeled,
    ),
    Task(
        name="TREC", kind="classification", metric="accuracy",
        templates={"paper": _t("paper", _trec_paper,
                               "<question>\\nAnswer type: -> Description/Entity/Expression/Human/Location/Number")},
        # TREC has no validation set; LM-BFF evaluates on its 500-question test set.
        hub=("trec", None), splits={"train": "train", "test": "test"}, eval_split="test", task_dir="trec",
    ),
]
