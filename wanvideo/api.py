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
from .devices import check_devices_available, parse_gpu_ids
from .latent_format import (LATENT_CHANNELS, SPATIAL_COMPRESSION, WAN21, LatentFormat, check_video_size,
                            denormalize_latents, latent_format_for, latent_frame_count, normalize_latents,
                            save_comfy_latent, save_preview_animation)
from .modules.attention import available_backends
from .modules.model import CLIP_DIM, CLIP_TOKENS
from .parallel import PARALLELISM_TYPES, load_parallel_pipeline
from .parallel.experts import IDLE_EXPERT_CHOICES, ExpertPairPipeline, load_expert_pair
from .parallel.plan import activation_reserve_bytes
from .parallel.distributed.sharding import SHARD_WEIGHTS_CHOICES
from .pipeline import LoadSettings, WanPipeline, load_pipeline
from .quantization import QUANTIZATION_MODES
from .sampling import SCHEDULERS, Conditioning, Inpaint, flow_sigmas, make_noise
from .sampling.loop import check_inputs
from .tiny import make_tiny_checkpoint, make_tiny_expert_pair

BASE_PRECISIONS = tuple(BASE_DTYPES)                  # 'fp32', 'bf16', 'fp16'
PARALLELISM_CHOICES = ("auto",) + PARALLELISM_TYPES   # what the Multi-GPU loader offers
ATTENTION_MODES = available_backends                  # a function: the backends installed here

__all__ = ["load", "LoadSettings", "BlockSwapSettings", "WanPipeline", "Conditioning", "Inpaint", "make_noise",
           "SCHEDULERS",
           "QUANTIZATION_MODES", "BASE_PRECISIONS", "PARALLELISM_CHOICES", "SHARD_WEIGHTS_CHOICES", "ATTENTION_MODES",
           "COMPILE_MODES",
           "CLIP_DIM", "CLIP_TOKENS", "LATENT_CHANNELS", "SPATIAL_COMPRESSION", "normalize_latents",
           "denormalize_latents", "latent_frame_count", "WAN21", "LatentFormat", "latent_format_for",
           "save_preview_animation", "save_comfy_latent",
           "check_video_size", "check_inputs", "check_devices_available", "parse_gpu_ids",
           "inspect_checkpoint",
           "CheckpointError", "make_tiny_checkpoint", "make_tiny_expert_pair", "flow_sigmas", "validate_gpu_setup",
           "print_gpu_status",
           "monitor_memory_usage", "memory_per_device", "run_activation_bytes", "ExpertPairPipeline", "load_expert_pair",
           "IDLE_EXPERT_CHOICES"]


def load(path, parallelism_type="none", gpu_ids=None, settings=None, device=None, offload_device="cpu",
         shard_weights="auto", low_noise_path=None, **plan_inputs):
    """Load `path` ready to generate -> WanPipeline (or ExpertPairPipeline with `low_noise_path`).

    low_noise_path: a Wan 2.2 A14B pair: `path` is the high-noise expert, this the low-noise one;
    both load with the same settings and strategy through parallel.experts.load_expert_pair
    (parallelism_type may then also be 'expert_parallel'; plan_inputs may add boundary,
    idle_expert, inner_parallelism, loras_by_expert).

    parallelism_type 'none' with a `device`: the standard single-device load (weights resting on
    `offload_device` when settings.load_device is 'offload_device'). Anything else goes through
    load_parallel_pipeline (gpu_ids, and plan_inputs: width, height, num_frames,
    enable_block_distribution, pipeline_branches, devices). shard_weights ('off' / 'on' / 'auto'):
    whether distributed workers split the weights among them (load_parallel_pipeline).
    """
    settings = settings or LoadSettings()
    if low_noise_path is not None:
        if parallelism_type == "none" and device is not None:
            plan_inputs["devices"] = [device]
        return load_expert_pair(path, low_noise_path, parallelism_type, gpu_ids, settings,
                                shard_weights=shard_weights, **plan_inputs)
    if parallelism_type == "none" and device is not None:
        return load_pipeline(path, device, settings, offload_device=offload_device)
    return load_parallel_pipeline(path, parallelism_type, gpu_ids, settings, shard_weights=shard_weights,
                                  **plan_inputs)


def memory_per_device():
    """One line per CUDA device: memory in use of its total (every process), or a note without GPUs."""
    if not torch.cuda.is_available():
        return "no GPU: running on the CPU"
    lines = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        lines.append(f"cuda:{index}: {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use")
    return "\n".join(lines)


def run_activation_bytes(pipeline, noise_shape, cfg):
    """Bytes a run needs on a device beyond the weights, for noise [B, 16, T, h, w] at this guidance
    scale (the planner's estimate): what a host's memory manager should make room for."""
    batch, _, frames, height, width = noise_shape
    settings = pipeline.settings
    per_item_pair = activation_reserve_bytes(pipeline.info, settings.base_precision, settings.quantization,
                                             width * SPATIAL_COMPRESSION, height * SPATIAL_COMPRESSION,
                                             (frames - 1) * 4 + 1)  # the estimate is for cond + uncond
    return int(per_item_pair * batch * (1.0 if cfg != 1 else 0.5))
