"""Parking: a model's device tensors moved to host memory and back, the tensors themselves kept.

When the host application needs the GPU memory (ComfyUI's 'Unload Models', or room for its text
encoder and VAE on a small card) a loaded pipeline steps aside: every tensor it keeps on a GPU is
copied into one host byte buffer per device, page-locked and sized exactly like block swap's host
buffers, and `tensor.data` is pointed at a typed view of it, which frees the device storage. Coming
back uploads each tensor to its device again and drops the buffer. The parameter and buffer objects
stay the same, so hooks, compiled blocks and anything else holding them keep working.
"""
import logging

import torch

from .block_swap import ALIGNMENT, _HostBuffer, _round_up, _typed_view

logger = logging.getLogger(__name__)

__all__ = ["ParkedTensors", "copy_to_host", "holds_device_memory", "park_tensors"]


def holds_device_memory(tensor):
    """Whether stepping aside should move this tensor: everything not already in CPU memory.
    (The CPU tests replace this to exercise parking without a GPU.)"""
    return tensor.device.type != "cpu"


def copy_to_host(tensors, device):
    """Copy `tensors` (all on `device`) into one host buffer, page-locked for a CUDA device, each at
    an aligned offset as block swap lays out its blocks -> (the buffer, one typed view per tensor).
    The copies are synchronous: the device storage may be freed right after."""
    offsets, offset = [], 0
    for tensor in tensors:
        offset = _round_up(offset, ALIGNMENT)
        offsets.append(offset)
        offset += tensor.numel() * tensor.element_size()
    host = _HostBuffer(offset, torch.device(device))
    views = [_typed_view(host.tensor, start, t.dtype, tuple(t.shape)) for t, start in zip(tensors, offsets)]
    with torch.no_grad():
        for tensor, view in zip(tensors, views):
            view.copy_(tensor.detach())
    return host, views


class ParkedTensors:
    """Tensors of one device parked in one host buffer; restore() brings them back."""

    def __init__(self, tensors, device):
        self.device = torch.device(device)
        self.tensors = list(tensors)
        self.host, views = copy_to_host(self.tensors, self.device)
        self.nbytes = sum(view.numel() * view.element_size() for view in views)
        for tensor, view in zip(self.tensors, views):
            tensor.data = view

    def restore(self):
        """Upload every tensor to its device again and free the host buffer. On out of memory the
        tensors already uploaded point at the host copy again (nothing is lost) and it raises."""
        restored = []
        try:
            with torch.no_grad():
                for tensor in self.tensors:
                    host_view = tensor.data
                    tensor.data = host_view.to(self.device, non_blocking=True, copy=True)
                    restored.append((tensor, host_view))
        except torch.OutOfMemoryError:
            for tensor, host_view in restored:
                tensor.data = host_view
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies read the host buffer: finish before it goes
        self.release()

    def release(self):
        """Drop the host buffer (tensors still pointing at it keep their memory, unpinned)."""
        self.tensors = []
        self.host.release()


def park_tensors(tensors):
    """Park the tensors that hold device memory (each once) -> [ParkedTensors], one per device."""
    by_device, seen = {}, set()
    for tensor in tensors:
        if id(tensor) in seen or not holds_device_memory(tensor):
            continue
        seen.add(id(tensor))
        by_device.setdefault(tensor.device, []).append(tensor)
    parked = []
    try:
        for device, group in by_device.items():
            parked.append(ParkedTensors(group, device))
    except BaseException:
        for done in parked:  # all or nothing: a half-parked model would run on two places
            done.restore()
        raise
    return parked
