"""ZeRO-3 parameter offload (ds_configs/zero3_offload.json) under MeZO.

On a GPU, ``offload_param`` device cpu keeps the partitions in host memory and the placement edits
them there. On this CPU-only machine DeepSpeed's CPU accelerator accepts the same config and runs
its offload path (the offload manager is configured for cpu; pinning is a no-op), but host and
compute memory are the same memory: these tests check that the config is taken, that the pieces
MeZO edits are DeepSpeed's own partitions, and that training is unchanged by it, not the
host-to-GPU transfers.
"""

from __future__ import annotations

import json

import pytest

from mezo_dist.placement.deepspeed_config import read_ds_config
from mezo_dist.errors import ConfigError
from tests.distributed.test_equivalence import trajectory, weights
from tests.helpers import ROOT, launch

ARGS = ["--max_steps", "6", "--max_length", "32", "--learning_rate", "1e-3", "--zo_eps", "1e-3", "--seed", "3",
        "--per_device_train_batch_size", "2", "--disable_tqdm", "--report_to", "none"]


def test_offload_equals_no_offload(tiny_models, text_file, tmp_path):
    outs = {}
    for name in ("zero3", "zero3_offload"):
        outs[name] = tmp_path / name
        launch("ranks", "launch/train.py", ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
                                              "--ds_config", f"ds_configs/{name}.json", "--output_dir", str(outs[name]), *ARGS])
    a, b = weights(outs["zero3"] / "final"), weights(outs["zero3_offload"] / "final")
    start = weights(tiny_models["opt"])
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3, "training did not move the parameters"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\nzero3 vs zero3_offload, 2 ranks, 6 steps: max |diff| = {worst:.3g}")
    assert worst <= 1e-6, worst
    assert [r["projected_grad"] for r in trajectory(outs["zero3"])] == [r["projected_grad"] for r in trajectory(outs["zero3_offload"])]


def test_offloaded_partitions_are_what_mezo_edits(tiny_models, tmp_path):
    out = tmp_path / "report.json"
    launch("torchrun", "tests/distributed/workers/offload_pieces.py", [str(tiny_models["opt"]), str(out)])
    report = json.loads(out.read_text())
    assert report["offload_device"] == "cpu"
    sharded = [p for p in report["pieces"] if p["shard"]]
    assert sharded and all(p["in_partition"] for p in sharded), report["pieces"]
    # Non-persistent partitions live on the offload device, and the piece (hence the noise) is there.
    assert all(p["partition_device"] == "cpu" and p["device"] == "cpu" for p in sharded if not p["persistent"])


def test_nvme_offload_is_refused(tmp_path):
    cfg = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    cfg["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": "/local_nvme"}
    path = tmp_path / "nvme.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"offloads parameters to nvme; .* supports offload_param device cpu"):
        read_ds_config(str(path))
