"""Several processes: torchrun's environment -> a process group (nccl on CUDA, gloo on CPU), and the
few collectives we use; a single plain process skips all of it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nanovlm.config import IGNORE_INDEX


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


def init() -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    use_cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 or "RANK" not in os.environ:
        return DistInfo(device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev, backend = (torch.device("cuda", local_rank), "nccl") if use_cuda else (torch.device("cpu"), "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60),
                                **({"device_id": dev} if use_cuda else {}))
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
    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


# ----------------------------------------------------- every rank joins every gradient all-reduce
def stand_in_batch(cfg, image_token_id: int) -> dict:
    """A blank image, no target: what a DDP rank trains on when skips emptied its micro-batch (no hung all-reduce)."""
    ids = torch.full((1, cfg.mp_image_token_length + 1), image_token_id, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
            "images": [torch.zeros(1, 3, cfg.vit_img_size, cfg.vit_img_size)]}


def vision_zero_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor | float:
    """0 x the projector's output on a blank image when a batch has none: every DDP rank reduces the same parameters."""
    images = batch.get("images")
    has = images.numel() > 0 if isinstance(images, torch.Tensor) else any(
        img is not None and img.numel() > 0 for img in images or ())
    if has:
        return 0.0
    size = model.cfg.vit_img_size
    blank = torch.zeros(1, 3, size, size, device=model.device, dtype=model.dtype)
    return model.MP(model.vision_encoder(blank)).sum() * 0.0
