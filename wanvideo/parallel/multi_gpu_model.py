"""The documented multi-GPU face of the model: a WanModel that records how it is meant to run
across GPUs, and the function that applies that to a loaded model.

    model = MultiGPUWanModel(**config, parallelism_type="block_distribution", gpu_ids=[0, 1])
    model.load_state_dict(weights)
    runnable = setup_multi_gpu_parallelism(model)    # same forward signature as WanModel

The pure architecture (wanvideo.modules.model.WanModel) knows nothing of this: the subclass only
stores the arguments, and the strategies act on the model through its seams.
"""
import copy
import logging

import torch

from ..devices import release_memory
from ..gpus import get_available_gpus
from ..modules.model import WanModel
from .block_distribution import distribute_model_blocks
from .devices import resolve_devices

logger = logging.getLogger(__name__)

# expert_parallel: the two experts of a Wan 2.2 A14B pair on separate GPUs (parallel/experts.py); it
# is in this list because the Multi-GPU loader offers it, and single models reject it below.
PARALLELISM_TYPES = ("none", "data_parallel", "block_distribution", "distributed", "expert_parallel")

__all__ = ["PARALLELISM_TYPES", "MultiGPUWanModel", "setup_multi_gpu_parallelism", "get_available_gpus",
           "distribute_model_blocks", "check_parallelism_type"]


def check_parallelism_type(parallelism_type, allow_auto=False):
    """For one model (not an expert pair): a known strategy, and not expert_parallel."""
    names = (("auto",) if allow_auto else ()) + PARALLELISM_TYPES
    if parallelism_type not in names:
        raise ValueError(f"parallelism_type {parallelism_type!r} is not one of {', '.join(map(repr, names))}.")
    if parallelism_type == "expert_parallel":
        raise ValueError("expert_parallel places the two experts of a Wan 2.2 A14B model on separate GPUs and needs a "
                         "low-noise expert file: give it as the loader's low_noise_model (api.load(..., "
                         "low_noise_path=...)), or choose another strategy for a single model.")


class MultiGPUWanModel(WanModel):
    """WanModel plus the multi-GPU arguments of the design card.

    parallelism_type: 'none', 'data_parallel', 'block_distribution' or 'distributed' (the last needs
      the checkpoint file: use load_parallel_pipeline); gpu_ids: "0,1", [0, 1] or None for every
      GPU; enable_block_distribution: let 'data_parallel' fall back to splitting the blocks across
      the GPUs when a whole replica fits none of them.
    """

    def __init__(self, *args, parallelism_type="none", gpu_ids=None, enable_block_distribution=False, **kwargs):
        check_parallelism_type(parallelism_type)
        super().__init__(*args, **kwargs)
        self.parallelism_type, self.gpu_ids = parallelism_type, gpu_ids
        self.enable_block_distribution = enable_block_distribution


def setup_multi_gpu_parallelism(model, parallelism_type=None, gpu_ids=None, enable_block_distribution=None,
                                devices=None, blocks_per_gpu=None):
    """Apply a strategy to an already loaded `model` (on the CPU or one device) and return a callable
    with the official forward signature. Defaults come from the model's own arguments
    (MultiGPUWanModel(parallelism_type=..., gpu_ids=..., enable_block_distribution=...)); a plain
    WanModel defaults to 'none'.

    'data_parallel' copies the model to each device; 'block_distribution' moves block ranges in place.
    'distributed' needs the checkpoint file (each worker loads its own weights): use
    load_parallel_pipeline(path, 'distributed', ...) or the Multi-GPU loader node.
    """
    parallelism_type = parallelism_type or getattr(model, "parallelism_type", "none")
    gpu_ids = gpu_ids if gpu_ids is not None else getattr(model, "gpu_ids", None)
    enable = (getattr(model, "enable_block_distribution", False) if enable_block_distribution is None
              else enable_block_distribution)
    check_parallelism_type(parallelism_type)
    if parallelism_type == "distributed":
        raise ValueError("The distributed strategy runs one worker process per GPU, each loading its own weights "
                         "from the checkpoint file: use load_parallel_pipeline(path, 'distributed', gpu_ids) or "
                         "the WanVideo Multi-GPU Loader node.")
    if parallelism_type == "none":
        return model
    devices = resolve_devices(gpu_ids, devices)
    if parallelism_type == "data_parallel":
        from .data_parallel import DataParallelWan
        try:
            replicas = {device: copy.deepcopy(model).to(device) for device in dict.fromkeys(devices[1:])
                        if device != devices[0]}  # copied before the original moves
            replicas[devices[0]] = model.to(devices[0])
            return DataParallelWan([replicas[d] for d in devices], devices)
        except torch.OutOfMemoryError:
            replicas = None
            model.to("cpu")
            release_memory()
            if not enable:
                raise
            logger.warning("A replica does not fit every GPU; distributing the blocks over %s instead.", devices)
    distribute_model_blocks(model, devices, blocks_per_gpu)  # block_distribution
    model.prefers_batched_cfg = True
    return model
