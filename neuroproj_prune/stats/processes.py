"""Processes and memory: the one multi-process set-up of the package, and the free memory of a device.

Under `accelerate launch` / torchrun (WORLD_SIZE > 1) each process joins one torch.distributed group — gloo
on CPUs, NCCL on GPUs — through Accelerate's `PartialState`; `distributed()` then says (dist, rank, world)
and every stage that streams calibration data takes every W-th batch and all-reduces its totals.
"""
from __future__ import annotations

import os

import torch


def distributed():
    """(torch.distributed, rank, world size) under `accelerate launch` / torchrun once the process group is up,
    else (None, 0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def join_processes(device: str = "auto") -> str:
    """Under `accelerate launch` (WORLD_SIZE > 1) initialise the process group and return the device
    Accelerate assigns this process (`device` itself when one was named). Without CUDA (or with device cpu /
    ACCELERATE_USE_CPU) the processes join a gloo group on the CPU: Accelerate only does that when asked with
    `cpu=True`. A single process: `device` unchanged, nothing initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch.distributed as dist
    from accelerate import PartialState

    if dist.is_available() and dist.is_initialized():
        return device
    cpu = (device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
           or (device == "auto" and not torch.cuda.is_available()))
    state = PartialState(cpu=cpu)
    return str(state.device) if device == "auto" else device


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations: CUDA's free memory on a GPU, MemAvailable of /proc/meminfo on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
