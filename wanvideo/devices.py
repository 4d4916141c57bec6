"""Small device helpers shared by the loader and the strategies."""
import contextlib
import gc

import torch


class DeviceOutOfMemoryError(MemoryError):
    """Out of memory on `device` while placing a model (strategies drop that device and plan again)."""

    def __init__(self, message, device):
        super().__init__(message)
        self.device = device


def release_memory():
    """Collect garbage and return cached CUDA memory to the driver (after unloading or a failure)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_bytes(device):
    """Bytes a new allocation can take on a CUDA device: free memory plus what PyTorch's cache holds
    unused; None for devices without a figure (CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def device_context(device):
    """Make `device` current while launching work on it (a no-op for the CPU)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
