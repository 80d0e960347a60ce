"""What the machine has for the KV: GPU memory after the weights, RAM, disk, each with headroom.

Both the planner and a cache made without a plan (`localkv.offload.make_cache` on a GPU) read the machine
through here, so they agree on what "free" means.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import torch

GPU_HEADROOM_BYTES = 3 * 2**30  # activations, attention workspace, the staging ring, the allocator's slack
RAM_SHARE = 0.6                    # of available RAM the CPU tier may take by default
DISK_SHARE = 0.9                   # of free disk the disk tier may take by default


def machine_budgets(device: torch.device, weights_bytes: int, disk_dir: Path | None) -> tuple[int, int, int]:
    """(GPU, CPU, disk) bytes the KV may take by default on this machine, headroom left."""
    ram = int(psutil.virtual_memory().available * RAM_SHARE)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Weights not yet loaded when planning ahead of a load: leave room for them.
        loaded = torch.cuda.memory_allocated(device)
        gpu = max(0, free - max(0, weights_bytes - loaded) - GPU_HEADROOM_BYTES)
        cpu = max(0, ram - weights_bytes if loaded < weights_bytes else ram)
    else:
        gpu, cpu = max(0, ram - weights_bytes), 0  # one memory: the "GPU" tier is the CPU's RAM
    disk = 0
    if disk_dir is not None:
        probe = Path(disk_dir)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        disk = int(shutil.disk_usage(probe).free * DISK_SHARE)
    return gpu, cpu, disk


def gpu_room(device: torch.device) -> int:
    """The GPU memory the planner would give the KV now: free memory (under the process's memory fraction,
    when one is set) less the headroom. For a cache made without a plan."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:
        free = min(free, int(get_fraction(index) * total) - torch.cuda.memory_reserved(index))
    return free - GPU_HEADROOM_BYTES
