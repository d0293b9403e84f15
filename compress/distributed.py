"""DistributedDataParallel under ``torchrun``: the only place that knows about process groups.

``torchrun --nproc_per_node N -m compress run RECIPE`` starts N copies of the CLI; each sees
WORLD_SIZE/RANK/LOCAL_RANK. Every rank loads the data, builds the models and runs the stages that
change them (train, distill, prune + fine-tune) on its shard of each epoch, with gradients averaged
by DDP (gloo on CPU, NCCL on GPU). Rank 0 alone writes the run directory and runs the stages that
only read models (export, quantize) and the benchmark; the others wait, then exit. Multi-node is
torchrun's business: ``--nnodes``, ``--node_rank``, ``--rdzv_endpoint`` (see the README).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun with more than one process."""
    world = world_size()
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small Python objects: a path, an error message)."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    if active():
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients of parameters DDP does not manage (a loss's own trainable parts)."""
    if active() and params:
        import torch.distributed as dist

        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around ``model`` when distributed; the model itself otherwise."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown() -> None:
    if active():
        import torch.distributed as dist

        dist.destroy_process_group()
