"""A loaded Wan model ready to generate: loading with LoRA, block swap and compile, and release.

`load_pipeline` is what the loader nodes and the example script call; the `WanPipeline` it returns
is what flows from the loader node to the sampler node. Multi-GPU strategies return a pipeline whose
`model` is wrapped (data parallel, block distribution) or whose `generate` runs in worker processes
(distributed); the sampler does not need to know which.
"""
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import inspect_checkpoint, load_wan_model
from .devices import DeviceOutOfMemoryError, release_memory
from .quantization import FAST_MODES, enable_fp8_fast
from .sampling import sample_video

logger = logging.getLogger(__name__)


@dataclass
class LoadSettings:
    """How to load: precision, fp8, attention, where the weights rest, LoRAs, block swap, compile."""
    base_precision: str = "bf16"
    quantization: str = "disabled"
    attention_mode: str = "sdpa"
    load_device: str = "main_device"     # or 'offload_device': weights rest in RAM between runs
    loras: list = field(default_factory=list)   # [(path, strength), ...]
    block_swap: Optional[object] = None  # BlockSwapSettings
    compile_args: Optional[dict] = None  # keyword arguments of wanvideo.compile.compile_blocks


class WanPipeline:
    """A loaded model and how to run it. `generate` samples a video; `unload` frees every device."""

    def __init__(self, model, info, device, settings, offload_device=None, placement=None):
        self.model, self.info, self.device, self.settings = model, info, torch.device(device), settings
        self.offload_device = offload_device
        self.placement = placement or f"all weights on {self.device}"
        self._cleanups = []
        self._finalizer = weakref.finalize(self, release_memory)

    def add_cleanup(self, fn):
        """Run `fn()` on unload (hooks to remove, workers to stop), last added first."""
        self._cleanups.append(fn)

    def generate(self, noise, positive, negative=None, **sampler_args):
        """Sample latents (model space) with wanvideo.sampling.sample_video; same arguments."""
        if self.model is None:
            raise RuntimeError("This model was unloaded; run the loader node again.")
        rests_offloaded = self.offload_device is not None
        if rests_offloaded:
            self.model.to(self.device)
        try:
            return sample_video(self.model, noise, positive, negative, **sampler_args)
        finally:
            if rests_offloaded:
                self.model.to(self.offload_device)
                release_memory()

    def unload(self):
        """Return every device's memory: cleanups (hooks, workers), then drop the weights."""
        while self._cleanups:
            try:
                self._cleanups.pop()()
            except Exception as error:  # keep releasing the rest
                logger.warning("Cleanup during unload failed: %s", error)
        self.model = None
        release_memory()

    def describe(self):
        """A few lines for people: what was loaded and where it lives."""
        s = self.settings
        lines = [self.info.summary(),
                 f"precision {s.base_precision}, quantization {s.quantization}, attention {s.attention_mode}",
                 self.placement]
        if s.loras:
            lines.append("LoRAs: " + ", ".join(f"{os.path.basename(str(p))} @ {w:g}" for p, w in s.loras))
        return "\n".join(lines)


def load_model(path, device, settings: LoadSettings, info=None, device_map=None):
    """Load the weights with LoRAs merged and fp8 applied, on `device` (or by `device_map`, see
    load_wan_model); no strategy yet. Nothing stays on any device if a step fails."""
    info = info or inspect_checkpoint(path)
    model = load_wan_model(path, device=device, base_precision=settings.base_precision,
                           quantization=settings.quantization, attention_mode=settings.attention_mode, info=info,
                           device_map=device_map)
    try:
        if settings.loras:
            from .lora import apply_loras
            apply_loras(model, settings.loras)
    except torch.OutOfMemoryError as error:
        del model
        release_memory()
        raise DeviceOutOfMemoryError(f"Out of memory on {device} while merging LoRAs.", device) from error
    except BaseException:
        del model
        release_memory()
        raise
    return model, info


def load_pipeline(path, device, settings: LoadSettings, offload_device="cpu"):
    """The standard single-device load: weights on `device` (or resting on `offload_device`), with
    optional block swap to pinned CPU memory and per-block torch.compile."""
    device = torch.device(device)
    swap = settings.block_swap
    swapping = swap is not None and swap.blocks_to_swap > 0
    rest_offloaded = settings.load_device == "offload_device" and not swapping
    # block swap packs the swapped blocks from CPU memory, so those loads go through RAM
    load_device = torch.device("cpu") if (swapping or rest_offloaded) else device
    model, info = load_model(path, load_device, settings)
    pipeline = WanPipeline(model, info, device, settings, offload_device=torch.device(offload_device)
                           if rest_offloaded else None)
    try:
        if swapping:
            from .parallel.offload import enable_block_swap
            swapper = enable_block_swap(model, device, swap)
            pipeline.add_cleanup(swapper.remove)
            host = "pageable CPU memory (slower)" if swapper.pinned_mode == "pageable" else "pinned CPU memory"
            pipeline.placement = (f"blocks 0-{swap.blocks_to_swap - 1} swapped from {host} "
                                  f"({swapper.pinned_bytes() / 2**30:.2f} GiB), the rest on {device} "
                                  f"({swapper.resident_bytes() / 2**30:.2f} GiB)")
        elif rest_offloaded:
            pipeline.placement = f"weights rest in {offload_device} memory, moved to {device} for each run"
        if settings.quantization in FAST_MODES and load_device.type == "cpu":  # now placed: fp8 matmuls on device
            enable_fp8_fast(model, [device])
        if settings.compile_args is not None:
            from .compile import compile_blocks
            compile_blocks(model, **settings.compile_args)
    except BaseException:
        pipeline.unload()
        raise
    logger.info("Loaded:\n%s", pipeline.describe())
    return pipeline
