"""Worker: build the zero3 placement from ds_configs/zero3_offload.json and report where DeepSpeed
put the partitions and what the placement hands to MeZO. Usage: offload_pieces.py MODEL_DIR OUT_JSON"""

import json
import sys

import torch


def main() -> None:
    model_dir, out = sys.argv[1:3]
    from mezo_dist.placement.deepspeed_config import read_ds_config
    from mezo_dist.distributed import init_distributed, teardown
    from mezo_dist.placement.zero3 import build_zero3

    state = init_distributed(use_deepspeed=True)
    placement = build_zero3(model_dir, read_ds_config("ds_configs/zero3_offload.json"), state, micro_batch=2,
                            dtype=torch.float32)
    offload_manager = placement.model.optimizer  # DeepSpeedZeRoOffload: the engine's parameter manager
    params = dict(placement.module.named_parameters())
    pieces = []
    for piece in placement.pieces():
        p = params[piece.name]
        storage = p.ds_tensor.untyped_storage()
        start = storage.data_ptr()
        pieces.append({
            "name": piece.name, "shard": piece.shard, "device": str(piece.local.device),
            "partition_device": str(p.ds_tensor.device), "persistent": bool(p.ds_persist),
            # A sharded piece must be a view into DeepSpeed's own partition, not a copy.
            "in_partition": start <= piece.local.data_ptr() < start + storage.nbytes(),
        })
    if state.is_main:
        with open(out, "w") as f:
            json.dump({"offload_device": str(offload_manager.offload_device), "compute_device": str(state.device),
                       "pieces": pieces}, f)
    teardown()


if __name__ == "__main__":
    main()
