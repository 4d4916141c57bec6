"""A loaded Wan model ready to generate: the one load sequence, the run, and the release.

`load_prepared_model` is the load sequence every strategy, worker and benchmark uses: weights from
the file straight to their devices, LoRAs merged, then the single-GPU engine in one order (block
swap, fp8 fast matmuls, per-block compile). `load_pipeline` is the single-device load; the
`WanPipeline` it returns is what flows from the loader node to the sampler node. Multi-GPU
strategies (wanvideo/parallel/) return a pipeline whose `denoiser` is a strategy wrapper with the
model's forward (data parallel), a model with a strategy installed (block distribution), or whose
`generate` runs in worker processes (distributed); the sampler does not need to know which.
"""
import functools
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import inspect_checkpoint, load_wan_model
from .devices import DeviceOutOfMemoryError, release_memory
from .engine import BlockSwapSettings, compile_blocks, enable_block_swap, enable_fp8_fast, get_block_swapper
from .engine.parking import park_tensors
from .modules.attention import check_backend
from .quantization import FAST_MODES
from .sampling import sample_video

logger = logging.getLogger(__name__)


@dataclass
class LoadSettings:
    """How to load: precision, fp8, attention, where the weights rest, LoRAs, block swap, compile."""
    base_precision: str = "bf16"
    quantization: str = "disabled"
    attention_mode: str = "sdpa"        # modules.attention.BACKENDS; 'auto' times sdpa against sage_triton per shape
    load_device: str = "main_device"     # or 'offload_device': weights rest in RAM between runs
    loras: list = field(default_factory=list)   # [(path, strength), ...]
    block_swap: Optional[BlockSwapSettings] = None
    compile_args: Optional[dict] = None  # keyword arguments of wanvideo.engine.compile_blocks

    def __post_init__(self):
        check_backend(self.attention_mode)  # an unknown or unusable attention fails before any file is read

    @property
    def swaps_blocks(self):
        return self.block_swap is not None and self.block_swap.blocks_to_swap > 0


class _Held:
    """What a pipeline holds: the denoiser, the cleanups that undo its strategy, and its tensors
    parked while it steps aside. The pipeline's finalizer owns this object and never the pipeline, so
    a pipeline that is dropped without unload() (ComfyUI evicting the loader's output) still runs
    its cleanups and frees its weights."""

    def __init__(self, denoiser):
        self.denoiser, self.cleanups, self.parked = denoiser, [], []

    def release(self):
        while self.cleanups:
            try:
                self.cleanups.pop()()
            except Exception as error:  # keep releasing the rest
                logger.warning("Cleanup during unload failed: %s", error)
        self.denoiser = None
        for parked in self.parked:
            parked.release()
        self.parked = []
        release_memory()


class WanPipeline:
    """A loaded model and how to run it. `generate` samples a video; `unload` frees every device;
    `step_aside` / `come_back` lend the devices' memory to the host application and take it back.

    denoiser: what the sampler calls, with WanModel.forward's signature: the WanModel itself (with
    any strategy installed through its seams) or a strategy wrapper (DataParallelWan); None for
    pipelines that sample elsewhere (distributed workers) and once unloaded.
    before_run: None, or a hook the host application installs (ComfyUI: comfy_host), called as
    before_run(pipeline, noise, sampler_args) at the start of every generate, to make room on the
    devices (it may call come_back()).
    """

    def __init__(self, denoiser, info, device, settings, offload_device=None, placement=None):
        self._held = _Held(denoiser)
        self.info, self.device, self.settings = info, torch.device(device), settings
        self.offload_device = offload_device
        self.placement = placement or f"all weights on {self.device}"
        self.before_run = None
        self._aside = False
        self._memory_by_device = {}
        self._finalizer = weakref.finalize(self, self._held.release)
        self._finalizer.atexit = False  # at exit the process returns everything; CUDA may be half gone

    @property
    def denoiser(self):
        return self._held.denoiser

    @denoiser.setter
    def denoiser(self, value):
        self._held.denoiser = value

    def add_cleanup(self, fn):
        """Run `fn()` on unload, or when the pipeline is dropped (hooks to remove, workers to stop),
        last added first. `fn` must not refer to the pipeline, or it would never be dropped."""
        self._held.cleanups.append(fn)

    def _before_run(self, noise, sampler_args):
        if self.before_run is not None:
            self.before_run(self, noise, sampler_args)
        self.come_back()

    def generate(self, noise, positive, negative=None, **sampler_args):
        """Sample latents (model space) with wanvideo.sampling.sample_video; same arguments."""
        if self.denoiser is None:
            raise RuntimeError("This model was unloaded; run the loader node again.")
        self._before_run(noise, sampler_args)
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
        self._finalizer()  # runs once: a second unload, or the drop after it, does nothing
        self._aside, self._memory_by_device = False, {}

    # --- stepping aside: the host application borrows the devices' memory ------------------------

    @property
    def is_aside(self):
        return self._aside

    def step_aside(self):
        """Give back the memory the model holds on its devices, keeping the model: weights on GPUs
        move to (pinned) CPU memory, block swap's slots are freed (its swapped blocks already live in
        host memory). come_back(), which every generate calls, restores them. Idempotent."""
        if self._aside or self.denoiser is None:
            return
        self._memory_by_device = self.memory_by_device()
        for swapper in self._swappers():
            swapper.release_slots()
        self._held.parked = park_tensors(self._tensors())
        self._aside = True
        if torch.cuda.is_available():  # no gc.collect here: ComfyUI calls this inside its loop over its
            torch.cuda.empty_cache()   # models, which another pipeline's finalizer could change under it
        logger.info("Stepped aside: %.2f GiB moved to CPU memory from %s.",
                    sum(p.nbytes for p in self._held.parked) / 2**30,
                    ", ".join(str(d) for d in self._memory_by_device) or "no device")

    def come_back(self):
        """Undo step_aside(): the weights and slots back on their devices (nothing to do if not aside)."""
        if not self._aside:
            return
        parked = self._held.parked
        while parked:
            try:
                parked[0].restore()
            except torch.OutOfMemoryError as error:  # what came back so far stays; a retry does the rest
                raise DeviceOutOfMemoryError(
                    f"Out of memory on {parked[0].device} while moving the model back from CPU memory; free "
                    "memory there (unload other models) and run again.", parked[0].device) from error
            parked.pop(0)
        for swapper in self._swappers():
            swapper.allocate_slots()
        self._aside = False
        logger.info("Came back to %s.", ", ".join(str(d) for d in self._memory_by_device) or "the CPU")

    def memory_by_device(self):
        """{device: bytes} the model keeps on each device it computes on while it is not aside (weights
        and block swap's slots; a model on the CPU counts its RAM): what a host's memory manager weighs
        against its other models. Measured now, or remembered from before step_aside()."""
        if self._aside or self.denoiser is None:
            return dict(self._memory_by_device)
        usage, resting = {}, self.offload_device is not None  # resting weights visit self.device for each run
        for tensor in self._tensors():
            device = self.device if resting else tensor.device
            usage[device] = usage.get(device, 0) + tensor.numel() * tensor.element_size()
        for swapper in self._swappers():
            usage[swapper.device] = usage.get(swapper.device, 0) + swapper.ring_size * swapper.slot_bytes
        on_accelerators = {d: n for d, n in usage.items() if d.type != "cpu"}
        return on_accelerators or {self.device: usage.get(self.device, sum(usage.values()))}

    def _models(self):
        """The nn.Modules holding the weights: the model, or each distinct data-parallel replica."""
        candidates = getattr(self.denoiser, "replicas", [self.denoiser])
        return list({id(m): m for m in candidates if isinstance(m, torch.nn.Module)}.values())

    def _tensors(self):
        return [t for model in self._models() for t in (*model.parameters(), *model.buffers())]

    def _swappers(self):
        """Active BlockSwappers: on a model itself, or on the stages its block runner holds (block
        distribution swaps per stage)."""
        holders = []
        for model in self._models():
            holders += [model, *getattr(getattr(model, "block_runner", None), "stages", ())]
        return [s for s in map(get_block_swapper, holders) if s is not None]

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
        # Unload restores nothing to the GPU: the swapped blocks stay in CPU memory and go with the model.
        pipeline.add_cleanup(functools.partial(swapper.remove, restore_device="cpu"))
        swap = settings.block_swap
        host = "pageable CPU memory (slower)" if swapper.pinned_mode == "pageable" else "pinned CPU memory"
        pipeline.placement = (f"blocks 0-{swap.blocks_to_swap - 1} swapped from {host} "
                              f"({swapper.pinned_bytes() / 2**30:.2f} GiB), the rest on {device} "
                              f"({swapper.resident_bytes() / 2**30:.2f} GiB)")
    elif rest_offloaded:
        pipeline.placement = f"weights rest in {offload_device} memory, moved to {device} for each run"
    logger.info("Loaded:\n%s", pipeline.describe())
    return pipeline
