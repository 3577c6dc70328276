"""Several processes: torchrun's environment -> a process group, and the few collectives we use.

`torchrun --nproc-per-node N -m nanovlm train ...` sets RANK, LOCAL_RANK and WORLD_SIZE; we then
join a process group (nccl on CUDA, gloo on CPU) and each process takes its own slice of every
global batch. A single plain process needs none of this and skips it entirely.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from nanovlm.config import IGNORE_INDEX
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistInfo(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60), **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In place on every rank; a no-op for one process."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP across the process group; the bare model for one process."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------- every rank joins every gradient all-reduce
def stand_in_batch(cfg, image_token_id: int) -> dict:
    """One blank image and no supervised token. Under DDP, a rank whose micro-batch lost every
    sample to skips trains on this instead, so that all parameters still join the gradient
    all-reduce (with zero gradients) and the collective does not hang."""
    n = cfg.mp_image_token_length
    ids = torch.full((1, n + 1), image_token_id, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
            "images": [torch.zeros(1, 3, cfg.vit_img_size, cfg.vit_img_size)]}


def _has_images(batch: dict) -> bool:
    images = batch.get("images")
    if isinstance(images, torch.Tensor):
        return images.numel() > 0
    return any(img is not None and img.numel() > 0 for img in images or ())


def vision_zero_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor | float:
    """0 x the projector's output for one blank image when `batch` holds no image (text-only
    samples), else 0. The vision tower and projector then still get (zero) gradients: under DDP
    every rank all-reduces the same parameters, and one process takes the same optimizer steps
    as many."""
    if _has_images(batch):
        return 0.0
    size = model.cfg.vit_img_size
    blank = torch.zeros(1, 3, size, size, device=model.device, dtype=model.dtype)
    return model.MP(model.vision_encoder(blank)).sum() * 0.0
