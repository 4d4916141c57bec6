"""Parallel strategies, applied to a plain WanModel from outside."""
import logging

import torch

logger = logging.getLogger(__name__)


def get_available_gpus():
    """Indices of the CUDA devices this process can use (after CUDA_VISIBLE_DEVICES); [] without CUDA."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def setup_multi_gpu_parallelism(model, *args, **kwargs):
    raise NotImplementedError("multi-GPU strategies are not built yet")


def distribute_model_blocks(model, *args, **kwargs):
    raise NotImplementedError("block distribution is not built yet")
