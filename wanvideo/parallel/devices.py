"""Which devices a strategy runs on: GPU ids checked against what this process can use."""
import logging

import torch

from ..devices import parse_devices, parse_gpu_ids
from ..gpus import discovery

logger = logging.getLogger(__name__)


def resolve_devices(gpu_ids=None, devices=None):
    """GPU ids ("0,1", [0, 1], None = all) -> CUDA devices, dropping ids that are not usable GPUs with
    a warning. `devices` (devices as parse_devices reads them, CPU allowed) bypasses the GPU lookup
    (tests, CPU runs)."""
    if devices is not None:
        return parse_devices(devices)
    available = discovery.get_available_gpus()
    ids = available if gpu_ids is None or (isinstance(gpu_ids, str) and not gpu_ids.strip()) else parse_gpu_ids(gpu_ids)
    usable = [i for i in ids if i in available]
    dropped = [i for i in ids if i not in available]
    if dropped:
        logger.warning("GPU ids %s are not usable GPUs here (this process sees %s); continuing without them.",
                       dropped, available or "none")
    if not usable:
        raise RuntimeError(f"None of the GPUs {ids} is usable (this process sees {available or 'no GPU'}). Check "
                           "gpu_ids and CUDA_VISIBLE_DEVICES" + ("." if available else
                           ", or choose parallelism_type 'auto' or 'none' to run on the CPU."))
    return [torch.device("cuda", i) for i in usable]
