"""How one expert of a Wan 2.2 A14B pair leaves its GPU and comes back at the switch.

`HostMirror` copies an expert's device tensors once into page-locked host memory (one buffer per
device) and from then on stepping aside only points the tensors at that copy, which frees the GPU
memory at once, and coming back is one upload per tensor from pinned memory. The weights never
change after loading (LoRAs are merged at load), so the copy stays valid for the pipeline's life:
each switch costs one host-to-device copy of one expert (28.6 GB in bf16 for A14B), nothing more.
The price is host memory: a mirror per expert that ever steps aside.

`StepAside` uses the pipeline's own step_aside() / come_back() (wanvideo.pipeline: every strategy,
block swap included), which copies the weights out on each step-aside and frees the host copy on
return: slower per switch, no lasting host memory. Block-swapped models use it (their swapped blocks
already live in host memory and their slots are managed by the swapper).
"""
import logging
import time

import torch

from ..engine.parking import copy_to_host

logger = logging.getLogger(__name__)

__all__ = ["HostMirror", "StepAside", "residency_for", "pipeline_tensors"]


def pipeline_tensors(pipeline):
    """The parameters and buffers of a pipeline's model(s): the denoiser, or each data-parallel replica."""
    models = getattr(pipeline.denoiser, "replicas", [pipeline.denoiser])
    tensors, seen = [], set()
    for model in models:
        if isinstance(model, torch.nn.Module):
            for tensor in (*model.parameters(), *model.buffers()):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensors.append(tensor)
    return tensors


def _synchronize(devices):
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


class HostMirror:
    """An expert's device tensors mirrored once in host memory; leave() / enter() move nothing but
    the uploads. On CPU devices (tests) the mirror is ordinary memory and enter() copies it."""

    def __init__(self, pipeline):
        self.pipeline, self.resident = pipeline, True
        by_device = {}
        for tensor in pipeline_tensors(pipeline):
            by_device.setdefault(tensor.device, []).append(tensor)
        self.devices = list(by_device)
        self.entries, self.buffers = [], []  # entries: (tensor, host view, device)
        began = time.perf_counter()
        for device, tensors in by_device.items():
            buffer, views = copy_to_host(tensors, device)  # page-locked for CUDA devices
            self.buffers.append(buffer)
            self.entries += [(tensor, view, device) for tensor, view in zip(tensors, views)]
        self.nbytes = sum(view.numel() * view.element_size() for _, view, _ in self.entries)
        logger.info("Mirrored %.2f GiB of %s in %s host memory in %.1f s.", self.nbytes / 2**30,
                    pipeline.info.model_name if hasattr(pipeline.info, "model_name") else "the expert",
                    "/".join(sorted({b.mode for b in self.buffers})), time.perf_counter() - began)

    def leave(self):
        """Point every tensor at its host copy: the device memory is free once the queued work is done
        (the caching allocator reuses it for the next upload on the same stream)."""
        if self.resident:
            for tensor, view, _ in self.entries:
                tensor.data = view
            self.resident = False

    def enter(self):
        """Upload every tensor to its device (asynchronous from pinned memory, on the compute stream,
        so the kernels that follow wait for it)."""
        if not self.resident:
            with torch.no_grad():
                for tensor, view, device in self.entries:
                    tensor.data = view.to(device, non_blocking=True, copy=True)
            self.resident = True

    def release(self):
        self.entries = []
        for buffer in self.buffers:
            buffer.release()
        self.buffers = []


class StepAside:
    """The pipeline's own step_aside() / come_back(): every strategy, block swap included."""

    def __init__(self, pipeline):
        if not hasattr(pipeline, "step_aside"):
            raise NotImplementedError("This pipeline cannot step aside (no step_aside/come_back); keep both experts "
                                      "resident (idle_expert='resident') or load without block swap.")
        self.pipeline = pipeline
        self.devices = list(pipeline.memory_by_device()) if hasattr(pipeline, "memory_by_device") else [pipeline.device]

    @property
    def resident(self):
        return not self.pipeline.is_aside

    def leave(self):
        self.pipeline.step_aside()

    def enter(self):
        self.pipeline.come_back()

    def release(self):
        pass


def residency_for(pipeline):
    """HostMirror for models without block swap (one copy, fast switches), else StepAside."""
    settings = pipeline.settings
    compiled_with_graphs = (settings.compile_args or {}).get("mode") == "reduce-overhead"  # CUDA graphs keep pointers
    if settings.swaps_blocks or compiled_with_graphs or not pipeline_tensors(pipeline):
        return StepAside(pipeline)
    return HostMirror(pipeline)


def timed_switch(leaving, entering):
    """leaving.leave(), entering.enter(), finished on the devices -> seconds."""
    began = time.perf_counter()
    if leaving is not None:
        leaving.leave()
    entering.enter()
    _synchronize(entering.devices)
    return time.perf_counter() - began
