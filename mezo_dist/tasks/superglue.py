"""SuperGLUE tasks of the MeZO paper's OPT experiments: RTE, CB, BoolQ, WSC, WiC, MultiRC (yes/no
classification) and COPA, ReCoRD (multiple choice, the options are the candidates).

The "paper" prompts follow the prompt table in the appendix of Malladi et al. (2023), "Fine-Tuning
Language Models with Just Forward Passes". Rows may use either the official SuperGLUE release
schema (string or boolean labels, nested MultiRC/ReCoRD/WSC fields) or the flat schema of the
``super_glue`` hub copy (integer labels); both build the same sample.
"""

from __future__ import annotations

from typing import Any

from mezo_dist.errors import ConfigError
from mezo_dist.tasks.base import Sample, Task, Template, choice_sample, int_label, label_index

YES_NO = ["Yes", "No"]  # label 0 = Yes (entailment) in RTE
NO_YES = ["No", "Yes"]  # boolean tasks: False/0 -> No, True/1 -> Yes


# ------------------------------------------------------------------------------------------- RTE
def _rte_paper(row: dict[str, Any]) -> Sample:
    # '<premise>\nDoes this mean that "<hypothesis>" is true? Yes or No?\n' -> Yes/No
    gold = label_index(row["label"], {"entailment": 0, "not_entailment": 1}, task="RTE")
    context = f'{row["premise"]}\nDoes this mean that "{row["hypothesis"]}" is true? Yes or No?\n'
    return choice_sample(context, YES_NO, gold, row)


# -------------------------------------------------------------------------------------------- CB
def _cb_paper(row: dict[str, Any]) -> Sample:
    # 'Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\n' -> Yes/No/Maybe
    gold = label_index(row["label"], {"entailment": 0, "contradiction": 1, "neutral": 2}, task="CB")
    context = f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? Yes, No, or Maybe?\n'
    return choice_sample(context, ["Yes", "No", "Maybe"], gold, row)


# ----------------------------------------------------------------------------------------- BoolQ
def _boolq_paper(row: dict[str, Any]) -> Sample:
    # '<passage> <question>?' -> Yes/No (BoolQ questions are lowercase and lack the "?").
    gold = label_index(row["label"], {"False": 0, "True": 1}, task="BoolQ")
    return choice_sample(f'{row["passage"]} {row["question"]}?', [" " + w for w in NO_YES], gold, row)


# ------------------------------------------------------------------------------------------- WSC
def _wsc_paper(row: dict[str, Any]) -> Sample:
    # '<text>\nIn the previous sentence, does the pronoun "<span2>" refer to <span1>? Yes or No?\n'
    # The release nests the spans under "target"; the hub copy has them at the top level.
    spans = row.get("target", row)
    gold = label_index(row["label"], {"False": 0, "True": 1}, task="WSC")
    context = (f'{row["text"]}\nIn the previous sentence, does the pronoun "{str(spans["span2_text"]).lower()}" '
               f'refer to {spans["span1_text"]}? Yes or No?\n')
    return choice_sample(context, NO_YES, gold, row)


# ------------------------------------------------------------------------------------------- WiC
def _wic_paper(row: dict[str, Any]) -> Sample:
    # 'Does the word "<word>" have the same meaning in these two sentences? Yes, No?\n<s1>\n<s2>\n'
    gold = label_index(row["label"], {"False": 0, "True": 1}, task="WIC")
    context = (f'Does the word "{row["word"]}" have the same meaning in these two sentences? Yes, No?\n'
               f'{row["sentence1"]}\n{row["sentence2"]}\n')
    return choice_sample(context, NO_YES, gold, row)


# --------------------------------------------------------------------------------------- MultiRC
def _multirc_expand(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Release rows are paragraphs {"passage": {"text", "questions": [{"question", "answers":
    [{"text", "label"}]}]}}; a sample is one answer option, as in the hub's flat copy."""
    passage = row.get("passage")
    if not isinstance(passage, dict):
        return [row]  # already flat: paragraph / question / answer / label
    out = []
    for q in passage["questions"]:
        for a in q["answers"]:
            out.append({
                "paragraph": passage["text"], "question": q["question"], "answer": a["text"], "label": a["label"],
                "idx": {"paragraph": row.get("idx"), "question": q.get("idx"), "answer": a.get("idx")},
            })
    return out


def _multirc_paper(row: dict[str, Any]) -> Sample:
    # '<paragraph>\nQuestion: <question>\nI found this answer "<answer>". Is that correct? Yes or No?\n'
    gold = label_index(row["label"], {"False": 0, "True": 1}, task="MultiRC")
    context = (f'{row["paragraph"]}\nQuestion: {row["question"]}\n'
               f'I found this answer "{row["answer"]}". Is that correct? Yes or No?\n')
    return choice_sample(context, NO_YES, gold, row)


# ------------------------------------------------------------------------------------------ COPA
def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _copa_paper(row: dict[str, Any]) -> Sample:
    # '<premise> so/because <choice>': the premise loses its final period, "so" joins an effect
    # and "because" a cause, and each choice continues the sentence with a lowercase first letter.
    premise = str(row["premise"]).rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    question = row["question"]
    if question not in ("cause", "effect"):
        raise ConfigError(f"task Copa: question must be 'cause' or 'effect', not {question!r}")
    conj = "because" if question == "cause" else "so"
    cands = [" " + _lower_first(str(row["choice1"]).strip()), " " + _lower_first(str(row["choice2"]).strip())]
    return choice_sample(f"{premise} {conj}", cands, int_label(row["label"], 2, task="Copa"), row)


# ---------------------------------------------------------------------------------------- ReCoRD
def _record_expand(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Release rows are {"passage": {"text", "entities": [{"start", "end"}]}, "qas": [{"id",
    "query", "answers": [{"start", "end", "text"}]}]} with inclusive ends; flatten to the hub's
    schema (passage, query, entities, answers), one row per query."""
    passage = row.get("passage")
    if not isinstance(passage, dict):
        return [row]
    text = passage["text"]
    entities = [text[e["start"]:e["end"] + 1] for e in passage["entities"]]
    return [
        {"passage": text, "query": qa["query"], "entities": entities,
         "answers": [a["text"] for a in qa.get("answers", [])], "idx": qa.get("id")}
        for qa in row["qas"]
    ]


def _record_paper(row: dict[str, Any]) -> Sample:
    # '<passage>\n-' then ' <query with @placeholder filled by the entity>' per entity; the
    # "@highlight" markers of the passage become "- " bullets. Reconstructed from memory of the
    # GPT-3-style ReCoRD prompt that MeZO uses for OPT; the paper's table lists
    # '<passage>\n<query with @placeholder replaced by the candidate>' (unsure about the "-").
    passage = str(row["passage"]).replace("@highlight\n", "- ")
    query = str(row["query"])
    entities = list(dict.fromkeys(row["entities"]))  # unique, first-seen order
    answers = set(row["answers"])
    if not entities or not answers.intersection(entities):
        raise ConfigError(f"task ReCoRD: no candidate entity is a gold answer (query {query[:60]!r})")
    cands = [" " + query.replace("@placeholder", e) for e in entities]
    gold = next(i for i, e in enumerate(entities) if e in answers)
    accepted = [c for c, e in zip(cands, entities) if e in answers]
    return Sample(context=f"{passage}\n-", candidates=cands, gold=gold, answers=accepted, row=row)


# ----------------------------------------------------------------------------------------- tasks
def _paper(fn, description: str) -> dict[str, Template]:
    return {"paper": Template(name="paper", build=fn, description=description)}


_TRAIN_VAL = {"train": "train", "validation": "validation"}

TASKS: list[Task] = [
    Task(name="RTE", kind="classification", metric="accuracy",
         templates=_paper(_rte_paper, '<premise>\\nDoes this mean that "<hypothesis>" is true? Yes or No?\\n'
                                      " -> Yes/No"),
         hub=("super_glue", "rte"), splits=dict(_TRAIN_VAL), task_dir="rte"),
    Task(name="CB", kind="classification", metric="accuracy",
         templates=_paper(_cb_paper, 'Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\\n'
                                     " -> Yes/No/Maybe"),
         hub=("super_glue", "cb"), splits=dict(_TRAIN_VAL), task_dir="cb", num_dev=100),
    Task(name="BoolQ", kind="classification", metric="accuracy",
         templates=_paper(_boolq_paper, "<passage> <question>? -> No/Yes"),
         hub=("super_glue", "boolq"), splits=dict(_TRAIN_VAL), task_dir="boolq"),
    Task(name="WSC", kind="classification", metric="accuracy",
         templates=_paper(_wsc_paper, '<text>\\nIn the previous sentence, does the pronoun "<span2>" refer to '
                                      "<span1>? Yes or No?\\n -> No/Yes"),
         hub=("super_glue", "wsc.fixed"), splits=dict(_TRAIN_VAL), task_dir="wsc"),
    Task(name="WIC", kind="classification", metric="accuracy",
         templates=_paper(_wic_paper, 'Does the word "<word>" have the same meaning in these two sentences? '
                                      "Yes, No?\\n<sentence1>\\n<sentence2>\\n -> No/Yes"),
         hub=("super_glue", "wic"), splits=dict(_TRAIN_VAL), task_dir="wic"),
    Task(name="MultiRC", kind="classification", metric="accuracy",
         templates=_paper(_multirc_paper, '<paragraph>\\nQuestion: <question>\\nI found this answer "<answer>". '
                                          "Is that correct? Yes or No?\\n -> No/Yes"),
         hub=("super_glue", "multirc"), splits=dict(_TRAIN_VAL), task_dir="multirc", expand=_multirc_expand),
    Task(name="Copa", kind="multiple_choice", metric="accuracy",
         templates=_paper(_copa_paper, "<premise without period> because|so -> <choice1>/<choice2>"),
         hub=("super_glue", "copa"), splits=dict(_TRAIN_VAL), task_dir="copa", num_dev=100),
    Task(name="ReCoRD", kind="multiple_choice", metric="accuracy",
         templates=_paper(_record_paper, "<passage>\\n- -> <query with @placeholder = each entity>"),
         hub=("super_glue", "record"), splits=dict(_TRAIN_VAL), task_dir="record", expand=_record_expand),
]
