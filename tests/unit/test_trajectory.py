"""The trajectory schema (mezo_dist/trajectory.py): one set of defaults for rows written before a
key existed, the step seed apart from the run seed, and the names it keeps without torch agreeing
with the optimizers' own."""

from __future__ import annotations

import json

import pytest
import torch

from mezo_dist import trajectory, wrap
from mezo_dist.replay import replay
from mezo_dist.zo import noise, optimizers
from mezo_dist.zo.step import MeZO
from tests.unit.test_zo_optimizers import X, make, tiny_net


def run_rows(zo, model, steps: int = 4) -> list[dict]:
    """Rows as training writes them (through JSON, as on disk)."""
    rows = []
    for _ in range(steps):
        res = zo.step(lambda: model(X).pow(2).mean())
        rows.append(json.loads(json.dumps(trajectory.zo_row(res, zo))))
    return rows


def test_names_kept_without_torch_match_the_optimizers_and_perturbations():
    assert trajectory.OPTIMIZERS == optimizers.NAMES == tuple(trajectory.ROW_FIELDS)
    assert trajectory.PERTURBATIONS == noise.KINDS


def test_a_row_without_the_newer_keys_is_a_blocks_gaussian_mezo_step(tmp_path):
    """The first release wrote neither noise, perturbation nor optimizer: such rows replay as the
    blocks stream, Gaussian z and MeZO, bit for bit."""
    model = tiny_net()
    zo = MeZO(wrap(model), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=5, kernel="blocks")
    rows = run_rows(zo, model)
    assert "noise" not in rows[0] and "optimizer" not in rows[0] and rows[0]["perturbation"] == "gaussian"
    old = [{k: v for k, v in row.items() if k != "perturbation"} for row in rows]
    path = tmp_path / "trajectory.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in old))
    read = trajectory.read_trajectory(path)
    assert [(trajectory.value(r, "noise"), trajectory.value(r, "perturbation"), trajectory.value(r, "optimizer"))
            for r in read] == [("blocks", "gaussian", "mezo")] * len(rows)
    fresh = tiny_net()
    replay(wrap(fresh), read)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_the_row_holds_the_step_seed_under_its_first_release_key(name):
    model = tiny_net()
    zo = make(name, model, seed=7)
    rows = run_rows(zo, model, steps=3)
    assert zo.run_seed == 7
    for t, row in enumerate(rows):
        assert row[trajectory.STEP_SEED] == row["seed"] == noise.step_seed(7, t) != 7
        assert trajectory.replay_args(row)["step_seed"] == row["seed"]
    # Every row carries what the schema asks of its optimizer.
    assert all(key in rows[0] for key in trajectory.ROW_FIELDS[name] + tuple(trajectory.HYPER_FLAGS[name]))


def test_defaults_are_what_the_writer_leaves_out():
    """Each key the writer omits when it holds its default reads back as that default."""
    model = tiny_net()
    zo = MeZO(wrap(model), lr=1e-2, eps=1e-3, seed=1, kernel="blocks")
    row = run_rows(zo, model, steps=1)[0]
    for key in ("noise", "optimizer", "precision", "skipped", "directions"):
        assert key not in row
        assert trajectory.value(row, key) == trajectory.DEFAULTS[key]
