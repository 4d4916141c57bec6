"""Parallel strategies, applied to a plain WanModel from outside through its seams.

    none                one device (the single-GPU engine: block swap, fp8, compile)
    data_parallel       a replica per device, batch split across them          data_parallel.py
    block_distribution  contiguous block ranges per device, branches pipelined  block_distribution.py
    distributed         a worker process per GPU: sequence and CFG parallelism  distributed/

    load.py             load_parallel_pipeline: the one entry point (devices, plan, load, degrade)
    plan.py, auto.py    the planner: checkpoint header x free memory -> a plan with a reason
    multi_gpu_model.py  the documented MultiGPUWanModel and setup_multi_gpu_parallelism
    devices.py          GPU ids -> usable devices
"""
from ..gpus import get_available_gpus
from .block_distribution import distribute_model_blocks
from .devices import resolve_devices
from .load import load_parallel_pipeline
from .multi_gpu_model import PARALLELISM_TYPES, MultiGPUWanModel, setup_multi_gpu_parallelism

__all__ = ["PARALLELISM_TYPES", "MultiGPUWanModel", "get_available_gpus", "setup_multi_gpu_parallelism",
           "distribute_model_blocks", "load_parallel_pipeline", "resolve_devices"]
