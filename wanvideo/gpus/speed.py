"""How fast each GPU computes, relative to the others: a short bf16 matmul probe, cached.

The planner splits work between unlike GPUs by memory and by speed. `relative_speeds(gpus)`
answers {torch index: speed}, the fastest GPU 1.0:

  - a GPU dict may carry 'relative_speed' (tests, or a user who knows better): used as given;
  - GPUs of one model (the same name) are equally fast: nothing is measured;
  - otherwise each GPU is timed once (probe_tflops: PROBE_REPEATS bf16 matmuls of PROBE_SIZE square,
    about 0.1 s on a current GPU) and the figure cached by GPU UUID (or name) in memory and in a
    small JSON file (default_cache_path(): $WANVIDEO_GPU_SPEED_CACHE, else
    $XDG_CACHE_HOME/wanvideo-multigpu/gpu_speed.json, else ~/.cache/...); a later run reads it.
    Only figures that are finite and above 0 are kept, from the file as from the probe;
  - only GPUs of this machine are timed: a GPU of the inventory whose UUID is not that of a local
    GPU (get_gpu_info) is not probed, so an inventory of another machine, or a machine without
    CUDA, is planned with equal speeds ('not measured') unless the cache knows its GPUs.

Probing initialises CUDA in this process and leaves a CUDA context on each GPU it times; the
cached blocks of its matmuls are handed back (torch.cuda.empty_cache) before the planner reads
the GPUs' free memory again. It runs only for an inventory that mixes GPU models. The distributed
workers do not mind an initialised parent: they fork from a forkserver started by exec (spawned
where there is none, as on Windows), never from this process.
"""
import json
import logging
import math
import os
import time

import torch

from .discovery import get_gpu_info

logger = logging.getLogger(__name__)

__all__ = ["relative_speeds", "probe_tflops", "default_cache_path", "clear_speed_cache", "local_gpu_indices"]

PROBE_SIZE = 4096
PROBE_REPEATS = 8
_measured = {}  # cache key -> TFLOPS measured in this process


def default_cache_path():
    """Where measured speeds are kept between runs."""
    explicit = os.environ.get("WANVIDEO_GPU_SPEED_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wanvideo-multigpu", "gpu_speed.json")


def clear_speed_cache():
    """Forget the speeds measured in this process (the file stays)."""
    _measured.clear()


def _key(gpu):
    return gpu.get("uuid") or gpu.get("name") or f"index {gpu['index']}"


def probe_tflops(index, size=PROBE_SIZE, repeats=PROBE_REPEATS):
    """Achieved bf16 TFLOPS of `repeats` size x size matmuls on cuda:index (after one warm-up)."""
    device = torch.device("cuda", index)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    torch.matmul(a, b)
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    del a, b
    return 2 * size ** 3 * repeats / seconds / 1e12


def _usable_figure(value):
    """A TFLOPS figure as a float when it is a finite number above 0, else None (a cache file edited
    by hand, a probe timed as zero seconds)."""
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _read_cache(path):
    """{key: TFLOPS} from the cache file, keeping only finite figures above 0; {} when unreadable."""
    if not path:
        return {}
    try:
        with open(path) as file:
            data = json.load(file)
    except (OSError, ValueError, TypeError):
        return {}
    if not isinstance(data, dict):
        return {}
    figures = {str(k): _usable_figure(v) for k, v in data.items()}
    return {k: v for k, v in figures.items() if v is not None}


def local_gpu_indices():
    """{uuid: torch index} of the GPUs of this machine (get_gpu_info, which does not initialise
    CUDA); {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    return {g["uuid"]: g["index"] for g in get_gpu_info() if g.get("uuid")}


def _write_cache(path, figures):
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as file:
            json.dump(figures, file, indent=1, sort_keys=True)
    except OSError as error:  # a read-only home is no reason to fail a plan
        logger.info("Could not keep the GPU speeds in %s: %s", path, error)


def _given(gpus):
    values = [g.get("relative_speed") for g in gpus]
    if all(v is None for v in values):
        return None
    for gpu, value in zip(gpus, values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"GPU {gpu.get('index')}: relative_speed={value!r} is not a positive number; give every "
                             "GPU a relative_speed (the fastest 1.0), or none to let the planner measure them.")
    return {g["index"]: float(v) for g, v in zip(gpus, values)}


def relative_speeds(gpus, probe=None, cache_path=None):
    """{torch index: speed relative to the fastest (1.0)} and how it was found ('given', 'same model',
    'measured', 'not measured') -> (speeds, source). probe: a function index -> TFLOPS for the GPUs
    of `gpus` (default probe_tflops, on the local GPU with the same UUID: GPUs of another machine
    are not probed); cache_path: the JSON file (None: default_cache_path(); '' or False: memory only)."""
    if not gpus:
        return {}, "no GPU"
    given = _given(gpus)
    if given is not None:
        fastest = max(given.values())
        return {i: v / fastest for i, v in given.items()}, "given"
    if len({g.get("name") for g in gpus}) == 1:
        return {g["index"]: 1.0 for g in gpus}, "same model"
    equal = {g["index"]: 1.0 for g in gpus}

    def probe_targets():  # {index: what probe() takes}, looked up at the first figure not known yet
        if probe is not None:
            return {g["index"]: g["index"] for g in gpus}
        local = local_gpu_indices()  # this machine's GPUs only, by UUID: an inventory may describe another one
        return {g["index"]: local[g["uuid"]] for g in gpus if g.get("uuid") in local}

    targets = None
    path = default_cache_path() if cache_path is None else cache_path
    stored = _read_cache(path)
    figures, changed, probed = {}, False, False
    try:
        for gpu in gpus:
            key = _key(gpu)
            if key not in _measured and key in stored:
                _measured[key] = stored[key]
            if key not in _measured:
                targets = probe_targets() if targets is None else targets
                if gpu["index"] not in targets:
                    logger.info("GPU %s (%s) is not a GPU of this machine, so its speed is not measured: the GPUs "
                                "are taken as equally fast (give each a 'relative_speed' to say otherwise).",
                                gpu["index"], gpu.get("name"))
                    return equal, "not measured"
                try:
                    probed = True
                    figure = _usable_figure((probe or probe_tflops)(targets[gpu["index"]]))
                    if figure is None:
                        raise ValueError("the probe gave no positive, finite TFLOPS figure")
                except Exception as error:  # a busy or broken GPU: plan without its speed
                    logger.warning("Could not time GPU %s (%s): its speed is taken as equal to the others'.",
                                   gpu["index"], error)
                    return equal, "not measured"
                _measured[key] = stored[key] = figure
                changed = True
                logger.info("GPU %s (%s): %.0f bf16 TFLOPS measured.", gpu["index"], gpu.get("name"), figure)
            figures[gpu["index"]] = _measured[key]
    finally:
        if probed:  # hand the probe's cached blocks back before anyone reads the free memory again
            torch.cuda.empty_cache()
    if changed:
        _write_cache(path, stored)
    fastest = max(figures.values())
    return {i: v / fastest for i, v in figures.items()}, "measured"
