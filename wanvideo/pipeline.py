"""A loaded Wan model ready to generate: the one load sequence, the run, and the release.

`load_prepared_model` is the load sequence every strategy, worker and benchmark uses: weights from
the file straight to their devices, LoRAs merged, then the single-GPU engine in one order (block
swap, fp8 fast matmuls, per-block compile). `load_pipeline` is the single-device load; the
`WanPipeline` it returns is what flows from the loader node to the sampler node. Multi-GPU
strategies (wanvideo/parallel/) return a pipeline whose `denoiser` is a strategy wrapper with the
model's forward (data parallel), a model with a strategy installed (block distribution), or whose
`generate` runs in worker processes (distributed); the sampler does not need to know which.
"""
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import inspect_checkpoint, load_wan_model
from .devices import DeviceOutOfMemoryError, release_memory
from .engine import BlockSwapSettings, compile_blocks, enable_block_swap, enable_fp8_fast
from .quantization import FAST_MODES
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
    block_swap: Optional[BlockSwapSettings] = None
    compile_args: Optional[dict] = None  # keyword arguments of wanvideo.engine.compile_blocks

    @property
    def swaps_blocks(self):
        return self.block_swap is not None and self.block_swap.blocks_to_swap > 0


class WanPipeline:
    """A loaded model and how to run it. `generate` samples a video; `unload` frees every device.

    denoiser: what the sampler calls, with WanModel.forward's signature: the WanModel itself (with
    any strategy installed through its seams) or a strategy wrapper (DataParallelWan); None for
    pipelines that sample elsewhere (distributed workers) and once unloaded.
    """

    def __init__(self, denoiser, info, device, settings, offload_device=None, placement=None):
        self.denoiser, self.info, self.device, self.settings = denoiser, info, torch.device(device), settings
        self.offload_device = offload_device
        self.placement = placement or f"all weights on {self.device}"
        self._cleanups = []
        self._finalizer = weakref.finalize(self, release_memory)

    def add_cleanup(self, fn):
        """Run `fn()` on unload (hooks to remove, workers to stop), last added first."""
        self._cleanups.append(fn)

    def generate(self, noise, positive, negative=None, **sampler_args):
        """Sample latents (model space) with wanvideo.sampling.sample_video; same arguments."""
        if self.denoiser is None:
            raise RuntimeError("This model was unloaded; run the loader node again.")
        rests_offloaded = self.offload_device is not None
        if rests_offloaded:
            self.denoiser.to(self.device)
        try:
            return sample_video(self.denoiser, noise, positive, negative, **sampler_args)
        finally:
            if rests_offloaded:
                self.denoiser.to(self.offload_device)
                release_memory()

    def unload(self):
        """Return every device's memory: cleanups (hooks, workers), then drop the weights."""
        while self._cleanups:
            try:
                self._cleanups.pop()()
            except Exception as error:  # keep releasing the rest
                logger.warning("Cleanup during unload failed: %s", error)
        self.denoiser = None
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
    """Weights with LoRAs merged, on `device` (or placed by `device_map`, see load_wan_model); the
    engine is not applied yet. Nothing stays on any device if a step fails. -> (model, info)"""
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


def apply_engine(model, devices, settings: LoadSettings, swap_device=None):
    """The single-GPU engine on a placed model, in its one order: block swap onto `swap_device`
    (when settings swap blocks and a device is given), fp8 fast matmuls on `devices` (fast modes),
    per-block compile. -> the BlockSwapper, or None."""
    swapper = enable_block_swap(model, swap_device, settings.block_swap) \
        if settings.swaps_blocks and swap_device is not None else None
    try:
        if settings.quantization in FAST_MODES:
            enable_fp8_fast(model, devices)
        if settings.compile_args is not None:
            compile_blocks(model, **settings.compile_args)
    except BaseException:
        if swapper is not None:
            swapper.remove(restore_device="cpu")  # frees the pinned buffers and slots without an upload
        raise
    return swapper


def load_prepared_model(path, device, settings: LoadSettings, info=None):
    """The one load sequence for a whole model computing on `device`: load_model (to the CPU when
    blocks are swapped: swapped blocks are packed from CPU memory), then apply_engine.
    -> (model, info, swapper or None)"""
    device = torch.device(device)
    model, info = load_model(path, "cpu" if settings.swaps_blocks else device, settings, info)
    try:
        swapper = apply_engine(model, [device], settings, swap_device=device)
    except BaseException:
        del model
        release_memory()
        raise
    return model, info, swapper


def load_pipeline(path, device, settings: LoadSettings, offload_device="cpu"):
    """The standard single-device load: weights on `device` (or resting on `offload_device`), with
    optional block swap to pinned CPU memory, fp8 fast matmuls and per-block torch.compile."""
    device = torch.device(device)
    rest_offloaded = settings.load_device == "offload_device" and not settings.swaps_blocks
    if rest_offloaded:  # the weights rest in RAM; the engine computes on `device` when they visit it
        model, info = load_model(path, "cpu", settings)
        swapper = apply_engine(model, [device], settings)
    else:
        model, info, swapper = load_prepared_model(path, device, settings)
    pipeline = WanPipeline(model, info, device, settings, offload_device=torch.device(offload_device)
                           if rest_offloaded else None)
    if swapper is not None:
        pipeline.add_cleanup(swapper.remove)
        swap = settings.block_swap
        host = "pageable CPU memory (slower)" if swapper.pinned_mode == "pageable" else "pinned CPU memory"
        pipeline.placement = (f"blocks 0-{swap.blocks_to_swap - 1} swapped from {host} "
                              f"({swapper.pinned_bytes() / 2**30:.2f} GiB), the rest on {device} "
                              f"({swapper.resident_bytes() / 2**30:.2f} GiB)")
    elif rest_offloaded:
        pipeline.placement = f"weights rest in {offload_device} memory, moved to {device} for each run"
    logger.info("Loaded:\n%s", pipeline.describe())
    return pipeline
