"""Processes and devices for training: torchrun's environment, the process group, DDP or FSDP2 wrapping, threads
and bf16 autocast. One process without torchrun is the same code with world_size 1."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dgemma.hw import cores_allowed, fast_half
from dgemma.options import TrainError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we called init_process_group (and so destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every process, in rank order (a list of one without torchrun)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up on `device`. On CPUs it needs native bf16 instructions (AVX512-BF16,
    AMX or Arm's BF16, read from the CPU's flags by `hw.fast_half`); without them bf16 matmuls are emulated, measured
    5x (AVX-512) to 60x (AVX2) slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return fast_half(device)


def setup_distributed(device: str = "auto") -> Distributed:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); start the process group
    (nccl on GPUs, gloo on the CPU) when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainError("--device cuda but no CUDA GPU is visible; use --device cpu")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        owns = True
    return Distributed(rank, world, local_rank, local_world, dev, owns)


def set_threads(threads: int | None, env: Distributed) -> None:
    """--threads, else the cores shared out between the processes on this machine."""
    if threads is not None:
        torch.set_num_threads(threads)
    elif env.device.type == "cpu" and env.local_world_size > 1:
        torch.set_num_threads(max(1, cores_allowed() // env.local_world_size))


def wrap(step_module: nn.Module, layers: nn.ModuleList, env: Distributed, fsdp: bool) -> nn.Module:
    """What the loop calls: `step_module` itself on one process, DDP around it, or FSDP2 (each layer, then the
    whole) with `fsdp`. Its forward runs the whole objective, so the wrappers' hooks see every use of the weights."""
    if env.enabled and fsdp:
        from torch.distributed.fsdp import fully_shard

        # Layers return their keys/values as transposed views for the cache; nothing modifies them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for layer in layers:
            fully_shard(layer)
        fully_shard(step_module)
        return step_module
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(step_module, forward_sync_buffers=False)  # buffers are constants
    return step_module
