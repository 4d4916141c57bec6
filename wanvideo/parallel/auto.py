"""The planner's front: a checkpoint (or its header) and this machine's GPUs -> the plan to load with.

plan.py holds the memory model and the decisions; this module only gathers what it needs: the
CheckpointInfo (read from the file's header, no weights) and the GPU inventory (wanvideo.gpus).
"""
import logging
import os

from ..checkpoint import CheckpointInfo, inspect_checkpoint
from ..gpus import get_gpu_info
from .plan import plan_parallelism

logger = logging.getLogger(__name__)

__all__ = ["get_optimal_gpu_config", "setup_optimal_parallelism"]


def _checkpoint_info(checkpoint_info_or_path):
    if isinstance(checkpoint_info_or_path, CheckpointInfo):
        return checkpoint_info_or_path
    return inspect_checkpoint(os.fspath(checkpoint_info_or_path))


def get_optimal_gpu_config(checkpoint_info_or_path, gpus=None, width=832, height=480, num_frames=81,
                           base_precision="bf16", quantization="disabled", cfg=True, batch_size=1, block_swap=False,
                           torch_compile=False, shard_weights="auto"):
    """The parallelism plan for this checkpoint on these GPUs -> dict for the loader.

    Reads only the checkpoint header. Keys: parallelism_type ('none', 'data_parallel',
    'block_distribution', 'distributed'), gpu_ids, base_precision, quantization, blocks_to_swap,
    blocks_to_swap_per_gpu, blocks_per_gpu, ulysses_degree, ring_degree, cfg_degree,
    estimated_memory_per_gpu (bytes, in gpu_ids order), shard_weights ('on': distributed with each
    GPU holding 1/N of the weights; 'off' otherwise) and reason. gpus: an inventory as from
    wanvideo.gpus.get_gpu_info() (None: read it now). block_swap, torch_compile: whether the loader
    asks for them (they rule out the distributed strategy). shard_weights: 'off' keeps the planner
    from sharding the weights ('auto', 'on': it may). See plan.py for the memory model.
    """
    info = _checkpoint_info(checkpoint_info_or_path)
    gpus = get_gpu_info() if gpus is None else gpus
    return plan_parallelism(info, gpus, width=width, height=height, num_frames=num_frames,
                            base_precision=base_precision, quantization=quantization, cfg=cfg, batch_size=batch_size,
                            block_swap=block_swap, torch_compile=torch_compile, shard_weights=shard_weights)


def setup_optimal_parallelism(model_path, **settings):
    """get_optimal_gpu_config(model_path, **settings), logged: the plan to hand to the loader."""
    config = get_optimal_gpu_config(model_path, **settings)
    logger.info("Parallelism plan: %s on GPUs %s. %s", config["parallelism_type"], config["gpu_ids"] or "none (CPU)",
                config["reason"])
    return config
