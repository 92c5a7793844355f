"""Registry of the MeZO paper's tasks: ``get_task("sst2")`` returns the SST2 :class:`Task`.

Names are looked up case-insensitively; the canonical spellings are those of the MeZO reference.
"""

from __future__ import annotations

from mezo_dist.errors import ConfigError
from mezo_dist.tasks import glue, qa, superglue
from mezo_dist.tasks.base import Sample, Task, Template

# The paper's tasks in the reference's spelling, then the embedded default.
_ORDER = ("SST2", "RTE", "CB", "BoolQ", "WSC", "WIC", "MultiRC", "Copa", "ReCoRD", "SQuAD", "DROP",
          "SST5", "SNLI", "MNLI", "TREC", "Polarity")

_BY_NAME: dict[str, Task] = {t.name: t for t in (*glue.TASKS, *superglue.TASKS, *qa.TASKS)}
assert set(_BY_NAME) == set(_ORDER), sorted(set(_BY_NAME) ^ set(_ORDER))

TASK_NAMES: tuple[str, ...] = _ORDER
_LOWER = {name.lower(): name for name in TASK_NAMES}


def get_task(name: str) -> Task:
    """The task called ``name`` (any letter case), e.g. ``get_task("boolq").name == "BoolQ"``."""
    key = _LOWER.get(str(name).strip().lower())
    if key is None:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return _BY_NAME[key]


__all__ = ["TASK_NAMES", "Sample", "Task", "Template", "get_task"]
