"""The small front that the ComfyUI nodes and the example script use: what to load, how, where.

Everything a face needs is named here, so a node file never reaches into the package's internals:

    pipeline = api.load(path, "auto", gpu_ids="0,1", settings=api.LoadSettings(base_precision="bf16"))
    latents = pipeline.generate(noise, api.Conditioning([text]), api.Conditioning([negative]), steps=30)
    pipeline.unload()
"""
import torch

from .checkpoint import BASE_DTYPES, CheckpointError, inspect_checkpoint
from .engine import BlockSwapSettings
from .engine.compile import COMPILE_MODES
from .gpus import monitor_memory_usage, print_gpu_status, validate_gpu_setup
from .latent_format import (LATENT_CHANNELS, SPATIAL_COMPRESSION, denormalize_latents, latent_frame_count,
                            normalize_latents, save_preview_animation)
from .modules.attention import available_backends
from .modules.model import CLIP_DIM, CLIP_TOKENS
from .parallel import PARALLELISM_TYPES, load_parallel_pipeline
from .pipeline import LoadSettings, WanPipeline, load_pipeline
from .quantization import QUANTIZATION_MODES
from .sampling import SCHEDULERS, Conditioning, make_noise
from .tiny import make_tiny_checkpoint

BASE_PRECISIONS = tuple(BASE_DTYPES)                  # 'fp32', 'bf16', 'fp16'
PARALLELISM_CHOICES = ("auto",) + PARALLELISM_TYPES   # what the Multi-GPU loader offers
ATTENTION_MODES = available_backends                  # a function: the backends installed here

__all__ = ["load", "LoadSettings", "BlockSwapSettings", "WanPipeline", "Conditioning", "make_noise", "SCHEDULERS",
           "QUANTIZATION_MODES", "BASE_PRECISIONS", "PARALLELISM_CHOICES", "ATTENTION_MODES", "COMPILE_MODES",
           "CLIP_DIM", "CLIP_TOKENS", "LATENT_CHANNELS", "SPATIAL_COMPRESSION", "normalize_latents",
           "denormalize_latents", "latent_frame_count", "save_preview_animation", "inspect_checkpoint",
           "CheckpointError", "make_tiny_checkpoint", "validate_gpu_setup", "print_gpu_status",
           "monitor_memory_usage", "memory_per_device"]


def load(path, parallelism_type="none", gpu_ids=None, settings=None, device=None, offload_device="cpu", **plan_inputs):
    """Load `path` ready to generate -> WanPipeline.

    parallelism_type 'none' with a `device`: the standard single-device load (weights resting on
    `offload_device` when settings.load_device is 'offload_device'). Anything else goes through
    load_parallel_pipeline (gpu_ids, and plan_inputs: width, height, num_frames,
    enable_block_distribution, pipeline_branches, devices).
    """
    settings = settings or LoadSettings()
    if parallelism_type == "none" and device is not None:
        return load_pipeline(path, device, settings, offload_device=offload_device)
    return load_parallel_pipeline(path, parallelism_type, gpu_ids, settings, **plan_inputs)


def memory_per_device():
    """One line per CUDA device: memory in use of its total (every process), or a note without GPUs."""
    if not torch.cuda.is_available():
        return "no GPU: running on the CPU"
    lines = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        lines.append(f"cuda:{index}: {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use")
    return "\n".join(lines)
