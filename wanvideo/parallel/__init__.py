"""Parallel strategies, applied to a plain WanModel from outside.

    none                one device (optionally with block swap, offload.py)
    data_parallel       a replica per device, batch split across them (data_parallel.py)
    block_distribution  contiguous block ranges per device, branches pipelined (block_distribution.py)
    distributed         a worker process per GPU: sequence and CFG parallelism (distributed/)

`load_parallel_pipeline` is the one entry point the Multi-GPU loader node and the example use:
it validates the devices, plans, loads and applies the strategy, dropping a device that is not
usable or runs out of memory (with a warning that names it) and planning again on the rest.
"""
import copy
import logging
from dataclasses import replace

import torch

from ..devices import DeviceOutOfMemoryError, free_bytes, release_memory
from ..modules.model import PARALLELISM_TYPES
from ..quantization import FAST_MODES, enable_fp8_fast
from .block_distribution import blocks_per_device_by_memory, distribute_model_blocks

logger = logging.getLogger(__name__)

__all__ = ["get_available_gpus", "setup_multi_gpu_parallelism", "distribute_model_blocks", "load_parallel_pipeline",
           "resolve_devices"]


def get_available_gpus():
    """Indices of the CUDA devices this process can use (after CUDA_VISIBLE_DEVICES); [] without CUDA."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def resolve_devices(gpu_ids=None, devices=None):
    """GPU ids ("0,1", [0, 1], None = all) -> CUDA devices, dropping ids that are not usable GPUs with
    a warning. `devices` (a list of torch.device, CPU allowed) bypasses the GPU lookup (tests, CPU runs)."""
    if devices is not None:
        return [torch.device(d) for d in devices]
    from multi_gpu_utils import parse_gpu_ids
    available = get_available_gpus()
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


def _load_replica(path, device, settings, info):
    """One full copy of the model on `device`, with the block swap of `settings` if any (tests inject
    failures here)."""
    from ..pipeline import load_model
    swap = settings.block_swap
    if swap is None or not swap.blocks_to_swap:
        return load_model(path, device, settings, info)[0]
    from .offload import enable_block_swap
    model = load_model(path, "cpu", settings, info)[0]
    enable_block_swap(model, device, replace(swap))  # released with the replica
    if settings.quantization in FAST_MODES:
        enable_fp8_fast(model, [device])
    return model


def _load_distributed(path, device_map, settings, info):
    """The model with its modules placed by `device_map` (tests inject failures here)."""
    from ..pipeline import load_model
    return load_model(path, device_map[""], settings, info, device_map=device_map)[0]


def _drop(devices, failed, error):
    if failed not in devices:  # not a device we can leave out (the host, say): nothing to plan again
        raise error
    remaining = [d for d in devices if d != failed]
    logger.warning("Dropped %s: %s. Planning again on %s.", failed, error, remaining or "no device")
    return remaining


def _build_data_parallel(path, devices, settings, info):
    from .data_parallel import DataParallelWan
    while devices:
        replicas_by_device = {}
        try:
            for device in dict.fromkeys(devices):  # one load per distinct device
                replicas_by_device[device] = _load_replica(path, device, settings, info)
        except DeviceOutOfMemoryError as error:
            replicas_by_device.clear()
            release_memory()
            devices = _drop(devices, torch.device(error.device), error)
            continue
        except BaseException:
            replicas_by_device.clear()
            release_memory()
            raise
        wrapper = DataParallelWan([replicas_by_device[d] for d in devices], devices)
        return wrapper, wrapper.describe(), wrapper.close
    raise MemoryError(f"{info.summary()} fits none of the GPUs for data parallelism. Use block_distribution, "
                      "fp8 quantization or block swap.")


def _capacities(devices, info, settings, reserve_bytes):
    """(bytes each device can give to blocks: free memory less the activation reserve, blocks that
    fit there). Devices without memory figures (CPU) get equal shares and no limit."""
    from ..checkpoint import resolve_dtype
    block_bytes, _ = info.bytes_at(resolve_dtype(settings.base_precision), settings.quantization)
    capacities, limits = [], []
    for device in devices:
        free = free_bytes(device)
        capacities.append(1 if free is None else max(0, free - reserve_bytes))
        limits.append(info.num_layers if free is None else capacities[-1] // block_bytes)
    return capacities, limits


def _build_block_distribution(path, devices, settings, info, blocks_per_gpu=None, blocks_to_swap_per_gpu=None,
                              pipeline=True, reserve_bytes=0):
    while devices:
        counts = blocks_per_gpu
        if counts is None or len(counts) != len(devices):
            capacities, limits = _capacities(devices, info, settings, reserve_bytes)
            swapping = settings.block_swap is not None and settings.block_swap.blocks_to_swap > 0
            try:  # with block swap the stages hold fewer blocks than they run: no limit then
                counts = blocks_per_device_by_memory(info.num_layers, capacities, None if swapping else limits)
            except ValueError as error:
                raise MemoryError(f"{info.summary()}: {error}") from None
            if 0 in counts:  # a device that holds no block would only add a hop
                for device, count in zip(devices, counts):
                    if not count:
                        logger.warning("Dropped %s: too little free memory for a share of the blocks next to the "
                                       "activations.", device)
                devices = [d for d, c in zip(devices, counts) if c]
                continue
        swaps = blocks_to_swap_per_gpu if blocks_to_swap_per_gpu and len(blocks_to_swap_per_gpu) == len(devices) \
            else _spread_swap(settings.block_swap, counts)
        device_map, start = {"": devices[0], "head": devices[-1]}, 0
        for device, count, swap in zip(devices, counts, swaps):
            for index in range(start, start + count):
                device_map[f"blocks.{index}"] = "cpu" if index - start < swap else device
            start += count
        try:
            model = _load_distributed(path, device_map, settings, info)
            distribution = distribute_model_blocks(model, devices, counts, pipeline=pipeline,
                                                   blocks_to_swap_per_device=swaps if any(swaps) else None,
                                                   swap_settings=settings.block_swap)
        except DeviceOutOfMemoryError as error:
            model = None
            release_memory()
            devices = _drop(devices, torch.device(error.device), error)
            blocks_per_gpu = None
            continue
        except BaseException:
            model = None
            release_memory()
            raise
        return model, distribution.describe(), distribution.remove
    raise MemoryError(f"{info.summary()} does not fit the GPUs even split by blocks. Use fp8 quantization or "
                      "block swap.")


def _spread_swap(swap, counts):
    """The loader's blocks_to_swap spread over the stages in proportion to their blocks (each stage
    swaps its first blocks)."""
    total = swap.blocks_to_swap if swap is not None else 0
    if not total:
        return [0] * len(counts)
    if total > sum(counts):
        raise ValueError(f"blocks_to_swap={total} is more than the model's {sum(counts)} blocks.")
    swaps = [total * c // sum(counts) for c in counts]
    for i in sorted(range(len(counts)), key=lambda i: counts[i] - swaps[i], reverse=True)[: total - sum(swaps)]:
        swaps[i] += 1
    return swaps


def load_parallel_pipeline(path, parallelism_type, gpu_ids=None, settings=None, width=832, height=480, num_frames=81,
                           devices=None, blocks_per_gpu=None, blocks_to_swap_per_gpu=None, pipeline_branches=True,
                           enable_block_distribution=True):
    """Load `path` and apply a strategy -> WanPipeline (see wanvideo.pipeline).

    parallelism_type: 'auto' (multi_gpu_utils.setup_optimal_parallelism), 'none', 'data_parallel',
    'block_distribution' or 'distributed'. gpu_ids: "0,1", [0, 1] or None for all; devices: explicit
    torch devices instead (CPU devices run every strategy, for tests). enable_block_distribution:
    let 'data_parallel' fall back to block distribution when the model fits no single device.
    """
    from ..checkpoint import inspect_checkpoint
    from ..pipeline import LoadSettings, WanPipeline, load_pipeline
    settings = settings or LoadSettings()
    info = inspect_checkpoint(path)
    if devices is None and not get_available_gpus() and parallelism_type in ("auto", "none"):
        logger.warning("No CUDA GPU is available: running on the CPU (expect minutes per step).")
        devices = [torch.device("cpu")]
    devices = resolve_devices(gpu_ids, devices)
    if parallelism_type == "auto":
        from multi_gpu_utils import get_gpu_info, setup_optimal_parallelism
        inventory = [g for g in get_gpu_info() if torch.device("cuda", g["index"]) in devices]
        plan = setup_optimal_parallelism(path, gpus=inventory, width=width, height=height, num_frames=num_frames,
                                         base_precision=settings.base_precision, quantization=settings.quantization)
        logger.info("auto: %s", plan["reason"])
        # the degrees are left to the workers: they choose per run, so a cfg-1 run uses every GPU
        return load_parallel_pipeline(
            path, plan["parallelism_type"], settings=_with_swap(settings, plan.get("blocks_to_swap", 0)),
            width=width, height=height, num_frames=num_frames,
            devices=[torch.device("cuda", i) for i in plan["gpu_ids"]] or [torch.device("cpu")],
            blocks_per_gpu=plan.get("blocks_per_gpu"), blocks_to_swap_per_gpu=plan.get("blocks_to_swap_per_gpu"),
            pipeline_branches=pipeline_branches, enable_block_distribution=enable_block_distribution)
    if parallelism_type not in PARALLELISM_TYPES:
        raise ValueError(f"parallelism_type {parallelism_type!r} is not one of 'auto', {', '.join(PARALLELISM_TYPES)}.")
    if parallelism_type == "none" or (len(devices) == 1 and parallelism_type != "distributed"):
        if parallelism_type != "none":
            logger.warning("%s with one device (%s) is the plain single-device model.", parallelism_type, devices[0])
        return load_pipeline(path, devices[0], settings)
    if parallelism_type == "distributed":
        from .distributed.pipeline import load_distributed_pipeline
        return load_distributed_pipeline(path, devices, settings)

    reserve = _activation_reserve(info, settings, width, height, num_frames)
    if parallelism_type == "data_parallel":
        try:
            model, placement, cleanup = _build_data_parallel(path, devices, settings, info)
        except MemoryError as error:
            if not enable_block_distribution:
                raise
            logger.warning("%s Falling back to block distribution over %s.", error, devices)
            model, placement, cleanup = _build_block_distribution(path, devices, settings, info,
                                                                  pipeline=pipeline_branches, reserve_bytes=reserve)
    else:
        model, placement, cleanup = _build_block_distribution(path, devices, settings, info, blocks_per_gpu,
                                                              blocks_to_swap_per_gpu, pipeline_branches, reserve)
    main = getattr(model, "device", None) or devices[0]
    pipeline = WanPipeline(model, info, main, settings, placement=placement)
    pipeline.add_cleanup(cleanup)
    if isinstance(model, torch.nn.Module):
        model.prefers_batched_cfg = pipeline_branches  # cond and uncond as micro-batches of one forward
    if settings.compile_args is not None:
        from ..compile import compile_blocks
        for replica in dict.fromkeys(getattr(model, "replicas", [model])):
            compile_blocks(replica, **settings.compile_args)
    return pipeline


def _with_swap(settings, blocks_to_swap):
    from .offload import BlockSwapSettings
    if not blocks_to_swap or (settings.block_swap and settings.block_swap.blocks_to_swap):
        return settings
    return replace(settings, block_swap=BlockSwapSettings(blocks_to_swap=blocks_to_swap))


def _activation_reserve(info, settings, width, height, num_frames):
    """Bytes each device keeps free for activations (plan.py's estimate, two branches)."""
    try:
        from .plan import ModelFootprint, _Workload
        footprint = ModelFootprint(info, settings.base_precision, settings.quantization)
        return _Workload(footprint, width, height, num_frames, True, 1).full_activation
    except Exception as error:  # the estimate is advisory; capacities then use all free memory
        logger.debug("No activation estimate: %s", error)
        return 0


def setup_multi_gpu_parallelism(model, parallelism_type=None, gpu_ids=None, enable_block_distribution=None,
                                devices=None, blocks_per_gpu=None):
    """Apply a strategy to an already loaded `model` (on the CPU or one device) and return a callable
    with the official forward signature. Defaults come from the model's own arguments
    (WanModel(parallelism_type=..., gpu_ids=..., enable_block_distribution=...)).

    'data_parallel' copies the model to each device; 'block_distribution' moves block ranges in place.
    'distributed' needs the checkpoint file (each worker loads its own weights): use
    load_parallel_pipeline(path, 'distributed', ...) or the Multi-GPU loader node.
    """
    parallelism_type = parallelism_type or model.parallelism_type
    gpu_ids = gpu_ids if gpu_ids is not None else model.gpu_ids
    enable = model.enable_block_distribution if enable_block_distribution is None else enable_block_distribution
    if parallelism_type not in PARALLELISM_TYPES:
        raise ValueError(f"parallelism_type {parallelism_type!r} is not one of {', '.join(PARALLELISM_TYPES)}.")
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
