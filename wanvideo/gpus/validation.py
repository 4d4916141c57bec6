"""Can these GPUs be used? One answer with the problem and the fix, never an exception for a bad id."""
import os

from ..devices import parse_gpu_ids
from .discovery import GIB, get_gpu_info

__all__ = ["validate_gpu_setup"]


def validate_gpu_setup(gpu_ids, min_free_bytes=None, max_utilization=None, gpus=None):
    """Can these GPUs be used? -> (is_valid, message).

    gpu_ids: list of ints or a string such as "0,1,2,3" (torch indices). min_free_bytes: each GPU
    must have at least this much free memory; max_utilization: no GPU may be busier (percent).
    gpus: an inventory as from get_gpu_info() (None: read it now). A failure names the problem and
    the fix; success summarises the GPUs. Bad thresholds (programming errors) raise ValueError.
    """
    if min_free_bytes is not None and min_free_bytes < 0:
        raise ValueError(f"min_free_bytes={min_free_bytes!r} is negative; give a number of bytes or None.")
    if max_utilization is not None and not 0 <= max_utilization <= 100:
        raise ValueError(f"max_utilization={max_utilization!r} is not a percentage from 0 to 100.")
    try:
        ids = parse_gpu_ids(gpu_ids)
    except ValueError as error:
        return False, str(error)
    gpus = get_gpu_info() if gpus is None else gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    if not gpus:
        return False, (f"GPUs {ids} were asked for, but this process sees no CUDA GPU. Install the NVIDIA driver "
                       f"and a CUDA build of PyTorch, check CUDA_VISIBLE_DEVICES (now {visible!r}), or run on the CPU.")
    by_index = {g["index"]: g for g in gpus}
    missing = [i for i in ids if i not in by_index]
    if missing:
        return False, (f"GPU{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                       f"{'do' if len(missing) > 1 else 'does'} not exist: this process sees {len(gpus)} GPU"
                       f"{'s' if len(gpus) > 1 else ''} ({', '.join(str(g['index']) for g in gpus)}). Use those ids; "
                       f"CUDA_VISIBLE_DEVICES (now {visible!r}) renumbers the GPUs it lists from 0.")
    problems = []
    for i in ids:
        gpu = by_index[i]
        if min_free_bytes is not None and gpu["free_memory"] < min_free_bytes:
            problems.append(f"GPU {i} ({gpu.get('name', '?')}) has {gpu['free_memory'] / GIB:.1f} GiB free, less than "
                            f"the {min_free_bytes / GIB:.1f} GiB needed: close the programs using it (nvidia-smi lists "
                            "them), choose another GPU, or need less (fp8 quantization, block swap)")
        utilization = gpu.get("utilization")
        if max_utilization is not None and utilization is not None and utilization > max_utilization:
            problems.append(f"GPU {i} ({gpu.get('name', '?')}) is {utilization}% busy, above the {max_utilization}% "
                            "allowed: wait for the job running on it, or choose another GPU")
    if problems:
        return False, "; ".join(problems) + "."
    return True, (f"{len(ids)} GPU{'s' if len(ids) > 1 else ''} ready: " + "; ".join(
        f"GPU {i} {by_index[i].get('name', '?')}, {by_index[i]['free_memory'] / GIB:.1f} GiB free of "
        f"{by_index[i]['total_memory'] / GIB:.1f} GiB" for i in ids) + ".")
