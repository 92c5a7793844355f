"""docs/cluster-66b.md tells the truth: its flags exist and its memory table is the planner's."""

from __future__ import annotations

import re
import shlex

import pytest

from mezo_dist import plan
from tests.helpers import ROOT

DOC = (ROOT / "docs" / "cluster-66b.md").read_text()


def test_every_train_flag_in_the_recipe_exists():
    from transformers import HfArgumentParser

    from mezo_dist.config import ARG_GROUPS

    known = {a for action in HfArgumentParser(ARG_GROUPS)._actions for a in action.option_strings}
    blocks = re.findall(r"^```bash\n(.*?)^```$", DOC, flags=re.S | re.M)
    used = set()
    for block in blocks:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            for script in ("launch/train.py", "launch/slurm/train.sbatch"):
                if script in line:
                    used |= {t for t in shlex.split(line.split(script, 1)[1]) if t.startswith("--")}
    assert {"--hsdp_replicas", "--ds_config", "--torch_dtype"} <= used and used <= known, used - known


ROWS = {"FSDP2, HSDP 2 x 8": ("fsdp", 16, 2), "FSDP2, HSDP 4 x 8": ("fsdp", 32, 4),
        "ZeRO-3": ("zero3", None, 1)}


def memory_rows() -> list[list[str]]:
    table = DOC.split("## Memory per rank", 1)[1].split("\n\n")[2]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.mark.parametrize("row", memory_rows(), ids=lambda r: f"{r[0]} x{r[1]}")
def test_memory_table_is_the_planners(row):
    backend, _, replicas = ROWS[row[0]]
    gpus = int(row[1])
    s = plan.Setting(gpus=gpus, seq_len=400, batch_size=1, dtype="fp16", hsdp_replicas=replicas)
    shape = plan.opt_shape("66b")
    e, h = plan.estimate(shape, "mezo", backend, s), plan.host_io(shape, backend, s)
    want = [e.parameters, e.gathered, e.activations, e.total, h.startup, h.export, h.checkpoint]
    assert [float(c) for c in row[2:]] == [round(x / plan.GiB, 2) for x in want]
