"""Task, template and sample types shared by every task definition.

A *task* knows where its rows come from (a Hugging Face ``datasets`` path, or local JSON Lines
files with the official release's field names), how to turn a row into a :class:`Sample` with one
of its prompt *templates*, and how the MeZO paper draws its train/dev/eval sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mezo_dist.errors import ConfigError

KINDS = ("classification", "multiple_choice", "generation")
METRICS = ("accuracy", "f1")


@dataclass
class Sample:
    """One example, ready for scoring.

    Args:
        context: the prompt; a candidate (or the generated answer) is appended right after it.
        candidates: the verbalized options; empty for generation tasks.
        gold: index of the correct candidate; -1 for generation tasks.
        answers: gold answer strings for generation tasks; for classification and multiple choice
            the gold candidate's text (ReCoRD: every accepted surface form of the answer).
        answer_prefix: for generation tasks, the text put between the context and the answer when
            the answer is a training target or a demonstration (the templates end with "Answer:").
        row: the raw row the sample was built from (kept for tracing, not compared).
    """

    context: str
    candidates: list[str]
    gold: int
    answers: list[str]
    answer_prefix: str = " "
    row: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.candidates:
            if not 0 <= self.gold < len(self.candidates):
                raise ConfigError(f"gold index {self.gold} is out of range for {len(self.candidates)} candidates")
        elif self.gold != -1:
            raise ConfigError(f"a generation sample (no candidates) must have gold -1, not {self.gold}")
        if not self.answers:
            raise ConfigError("a sample needs at least one gold answer")

    @property
    def is_generation(self) -> bool:
        return not self.candidates

    @property
    def target(self) -> str:
        """The text that follows the context in a gold demonstration or a training target."""
        if self.candidates:
            return self.candidates[self.gold]
        return self.answer_prefix + self.answers[0]

    def is_correct(self, pred: int) -> bool:
        """Whether candidate ``pred`` is a right answer (ReCoRD may accept several candidates)."""
        return pred == self.gold or self.candidates[pred] in self.answers


@dataclass(frozen=True)
class Template:
    """A named prompt format: ``build`` maps one raw row (after expansion) to a Sample."""

    name: str
    build: Callable[[dict[str, Any]], Sample]
    description: str = ""


def choice_sample(context: str, candidates: list[str], gold: int, row: dict[str, Any]) -> Sample:
    """A classification / multiple-choice sample whose answer is the gold candidate's text."""
    if not 0 <= gold < len(candidates):
        raise ConfigError(f"label index {gold} is out of range for {len(candidates)} candidates")
    return Sample(context=context, candidates=list(candidates), gold=gold, answers=[candidates[gold]], row=row)


def label_index(value: Any, names: dict[str, int], *, task: str) -> int:
    """Map a row's label to a candidate index.

    Local release files store labels as strings ("entailment") or JSON booleans, while the Hugging
    Face copies store integers; both spellings are accepted so either source builds the same sample.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if 0 <= value < len(names):
            return value
    elif isinstance(value, str) and value in names:
        return names[value]
    expected = f"one of {sorted(names)} or 0..{len(names) - 1}"
    raise ConfigError(f"task {task}: unexpected label {value!r} (expected {expected})")


def int_label(value: Any, n: int, *, task: str) -> int:
    """An integer label in ``0..n-1`` (booleans are refused: they are labels of other tasks)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ConfigError(f"task {task}: unexpected label {value!r} (expected an integer in 0..{n - 1})")
    return value


class Row(dict):
    """A stored row that remembers where it came from (``origin``: a file and line, or a hub split
    and index), so that a row a template cannot use is reported with its place."""

    __slots__ = ("origin",)

    def __init__(self, row: dict[str, Any], origin: str) -> None:
        super().__init__(row)
        self.origin = origin


def first_field(row: dict[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` that ``row`` has; a KeyError naming them all if none."""
    for name in names:
        if name in row:
            return row[name]
    raise KeyError(" or ".join(names))


def read_jsonl_rows(path: Path, *, task: str) -> list[dict[str, Any]]:
    """Read a JSON Lines file whose every non-blank line is a JSON object of UTF-8 text."""
    from mezo_dist.data import check_encodable
    from mezo_dist.io import json_lines

    rows: list[dict[str, Any]] = []
    for n, row in json_lines(path, what=f"task {task}:"):
        if not isinstance(row, dict):
            raise ConfigError(f"task {task}: {path} line {n} is not a JSON object")
        check_encodable(row, where=f"task {task}: {path} line {n}")
        rows.append(Row(row, f"{path} line {n}"))
    return rows


@dataclass
class Task:
    """A task of the MeZO experiments.

    Args:
        name: canonical name (as spelled in the MeZO reference, e.g. "BoolQ").
        kind: "classification", "multiple_choice" or "generation".
        metric: "accuracy" or "f1" (generation tasks also report exact match).
        templates: prompt formats by name; "paper" is the prompt of the MeZO paper.
        hub: ``datasets.load_dataset`` path and config name, e.g. ("super_glue", "rte").
        splits: our split names ("train", "validation", sometimes "test") mapped to the split's
            stem, which is both the local file name (``<stem>.jsonl``) and the hub split name.
        task_dir: folder of the local files under the data directory.
        default_template: the template used when none is named.
        eval_split: the split that evaluation samples are drawn from.
        expand: turns one stored row into the rows ``build`` takes (MultiRC stores a paragraph
            with nested questions and answers; one sample is one answer option). Returning an
            empty list drops the row (e.g. SNLI pairs without a gold label).
        num_dev: the dev sample size when ``--num_dev`` is not given: the paper's 500, or 100
            for the tasks whose training split is small (CB: 250 rows, COPA: 400), as the
            MeZO reference's ``mezo.sh`` sets it.
        train_as_classification: the default training loss: cross-entropy over the candidates
            for classification tasks, the gold answer's tokens for multiple choice and
            generation (the reference's ``mezo.sh`` turns it off for COPA, ReCoRD, SQuAD, DROP).
    """

    name: str
    kind: str
    metric: str
    templates: dict[str, Template]
    hub: tuple[str, str | None]
    splits: dict[str, str]
    task_dir: str
    default_template: str = "paper"
    eval_split: str = "validation"
    expand: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
    num_dev: int = 500
    _cache: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict, init=False, repr=False,
                                                                compare=False)

    def __post_init__(self) -> None:
        # Definitions are code, so a bad one is a programming error, not a user error.
        assert self.kind in KINDS, self.kind
        assert self.metric in METRICS, self.metric
        assert "paper" in self.templates and self.default_template in self.templates, self.name
        assert "train" in self.splits and self.eval_split in self.splits, self.name

    @property
    def train_as_classification(self) -> bool:
        return self.kind == "classification"

    # ----------------------------------------------------------------------------------- loading
    def load(self, split: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
        """Rows of one split (expanded, see ``expand``), from local files or the hub.

        Args:
            split: one of ``self.splits`` ("train", "validation", ...).
            data_dir: folder holding ``<task_dir>/<stem>.jsonl``; None loads the hub copy with
                ``datasets.load_dataset`` (needs network access or a warm cache).
        """
        if split not in self.splits:
            raise ConfigError(f"task {self.name} has no split {split!r}; splits: {', '.join(self.splits)}")
        key = (split, str(data_dir))
        if key not in self._cache:
            stem = self.splits[split]
            rows = self._read_local(stem, Path(data_dir)) if data_dir is not None else self._read_hub(stem)
            if self.expand is not None:
                rows = [Row(sub, getattr(r, "origin", "a row")) for r in rows for sub in self._guarded(self.expand, r)]
            self._cache[key] = rows
        # A fresh list so callers may reorder it; the rows themselves are shared and read-only.
        return list(self._cache[key])

    def _read_local(self, stem: str, data_dir: Path) -> list[dict[str, Any]]:
        folder = data_dir / self.task_dir
        if not folder.is_dir():
            raise ConfigError(f"task {self.name}: data folder {folder} does not exist")
        path = folder / f"{stem}.jsonl"
        if not path.is_file():
            raise ConfigError(f"task {self.name}: data file {path} does not exist")
        return read_jsonl_rows(path, task=self.name)

    def _read_hub(self, stem: str) -> list[dict[str, Any]]:
        import datasets  # imported here: loading the library is slow and local runs do not need it

        path, config = self.hub
        if not path:
            raise ConfigError(f"task {self.name} has no hub copy; pass --data_dir")
        ds = datasets.load_dataset(path, config, split=stem)
        return [Row(dict(r), f"{path}{'/' + config if config else ''} split {stem} row {i}") for i, r in enumerate(ds)]

    # ---------------------------------------------------------------------------------- building
    def template(self, name: str | None = None) -> Template:
        name = self.default_template if name is None else name
        if name not in self.templates:
            raise ConfigError(f"task {self.name} has no template {name!r}; templates: {', '.join(self.templates)}")
        return self.templates[name]

    def build(self, row: dict[str, Any], template: str | None = None) -> Sample:
        """Turn one (expanded) row into a Sample with the named template (default if None)."""
        sample = self._guarded(self.template(template).build, row)
        if self.kind == "generation" and not sample.is_generation:
            raise ConfigError(f"task {self.name}: a generation template produced candidates")
        return sample

    def _guarded(self, fn: Callable[[dict[str, Any]], Any], row: dict[str, Any]) -> Any:
        """``fn(row)``, with any complaint about the row turned into one line naming the task,
        the row's place and the missing field."""
        where = getattr(row, "origin", "a row")
        prefix = f"task {self.name}: "
        try:
            return fn(row)
        except KeyError as e:
            raise ConfigError(f"{prefix}{where} has no field {e.args[0] if e.args else '?'}") from None
        except ConfigError as e:
            msg = str(e)
            if where in msg:
                raise
            raise ConfigError(f"{prefix}{where}: {msg.removeprefix(prefix)}") from None
        except (TypeError, AttributeError, ValueError, IndexError) as e:
            raise ConfigError(f"{prefix}{where} does not fit the template ({type(e).__name__}: {e})") from None

    def sample_splits(
        self,
        num_train: int,
        num_dev: int,
        num_eval: int,
        seed: int,
        *,
        data_dir: str | Path | None = None,
        template: str | None = None,
        eval_seed: int = 0,
    ) -> tuple[list[Sample], list[Sample], list[Sample]]:
        """Draw train, dev and eval samples the way the MeZO paper does.

        Train and dev are disjoint: one ``random.Random(seed)`` draw of ``num_train + num_dev``
        distinct rows of the train split, the first ``num_train`` for train and the rest for dev.
        When the split is too small for both (CB has 250 training rows while the paper asks for
        1,000 + 100), dev keeps its full size and train gets the remaining rows. Eval rows are
        drawn from ``eval_split`` with ``random.Random(eval_seed)``, fixed by default so that
        runs with different training seeds are scored on the same examples; when the split has
        at most ``num_eval`` rows, all of them are used in file order. The train split is not
        read when ``num_train + num_dev == 0`` (zero-shot runs on BoolQ/SQuAD, whose local
        copies have no train file).
        """
        if min(num_train, num_dev, num_eval) < 0:
            raise ConfigError(f"sample sizes must be >= 0, got {num_train}/{num_dev}/{num_eval}")
        train_rows: list[dict[str, Any]] = []
        dev_rows: list[dict[str, Any]] = []
        if num_train + num_dev > 0:
            pool = self.load("train", data_dir)
            if num_dev >= len(pool) and num_train > 0:
                raise ConfigError(f"task {self.name}: {num_dev} dev rows leave no training rows out of {len(pool)}")
            n_train = min(num_train, len(pool) - min(num_dev, len(pool)))
            n_dev = min(num_dev, len(pool) - n_train)
            picked = random.Random(seed).sample(range(len(pool)), n_train + n_dev)
            train_rows = [pool[i] for i in picked[:n_train]]
            dev_rows = [pool[i] for i in picked[n_train:]]
        eval_pool = self.load(self.eval_split, data_dir) if num_eval > 0 else []
        if len(eval_pool) <= num_eval:
            eval_rows = eval_pool
        else:
            eval_rows = [eval_pool[i] for i in random.Random(eval_seed).sample(range(len(eval_pool)), num_eval)]

        def build_all(rows: list[dict[str, Any]]) -> list[Sample]:
            return [self.build(r, template) for r in rows]

        return build_all(train_rows), build_all(dev_rows), build_all(eval_rows)
