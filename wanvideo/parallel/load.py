"""load_parallel_pipeline: the one entry point that loads a checkpoint with a strategy.

It validates the devices, plans ('auto'), loads through the pipeline's one load sequence and
applies the strategy, dropping a device that is not usable or runs out of memory (with a warning
that names it) and planning again on the rest. Nothing stays on any device after a failure.
"""
import logging
from dataclasses import replace

import torch

from ..checkpoint import inspect_checkpoint, resolve_dtype
from ..devices import DeviceOutOfMemoryError, free_bytes, release_memory
from ..engine import BlockSwapSettings
from ..gpus import discovery
from ..pipeline import LoadSettings, WanPipeline, apply_engine, load_model, load_pipeline, load_prepared_model
from .auto import read_inventory, setup_optimal_parallelism
from .block_distribution import blocks_per_device_by_memory, distribute_model_blocks
from .devices import resolve_devices
from .multi_gpu_model import check_parallelism_type
from .plan import activation_reserve_bytes

logger = logging.getLogger(__name__)


def _load_replica(path, device, settings, info):
    """One full copy of the model computing on `device`, through the one load sequence (tests
    inject failures here). A block swap is released with the replica."""
    settings = replace(settings, block_swap=replace(settings.block_swap)) if settings.swaps_blocks else settings
    return load_prepared_model(path, device, settings, info)[0]


def _load_placed(path, device_map, settings, info):
    """The weights with their modules placed by `device_map`, the engine not yet applied (tests
    inject failures here)."""
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
            try:  # with block swap the stages hold fewer blocks than they run: no limit then
                counts = blocks_per_device_by_memory(info.num_layers, capacities,
                                                     None if settings.swaps_blocks else limits)
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
            model = _load_placed(path, device_map, settings, info)
            distribution = distribute_model_blocks(model, devices, counts, pipeline=pipeline,
                                                   blocks_to_swap_per_device=swaps if any(swaps) else None,
                                                   swap_settings=settings.block_swap)
            apply_engine(model, devices, settings)  # each stage's swap is already in place
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
                           enable_block_distribution=True, shard_weights="auto"):
    """Load `path` and apply a strategy -> WanPipeline (see wanvideo.pipeline).

    parallelism_type: 'auto' (planned from the header and the GPUs' free memory by
    parallel.auto.setup_optimal_parallelism), 'none', 'data_parallel', 'block_distribution' or
    'distributed'. gpu_ids: "0,1", [0, 1] or None for all; devices: explicit devices instead (CPU
    devices run every strategy, for tests). enable_block_distribution: let 'data_parallel' fall
    back to block distribution when the model fits no single device. pipeline_branches: run CFG's
    cond and uncond as micro-batches pipelined across block_distribution's stages (else the stages
    take the whole batch in turn). shard_weights: 'distributed' only: 'on' splits the weights over
    the workers (each holds 1/N and gathers a block as it runs), 'off' gives each a whole copy,
    'auto' shards when a whole copy does not fit a GPU (and lets 'auto' plan a sharded group).
    """
    settings = settings or LoadSettings()
    check_parallelism_type(parallelism_type, allow_auto=True)
    from .distributed.sharding import check_shard_weights
    shard_weights = check_shard_weights(shard_weights)
    info = inspect_checkpoint(path)
    if devices is None and not discovery.get_available_gpus() and parallelism_type in ("auto", "none"):
        logger.warning("No CUDA GPU is available: running on the CPU (expect minutes per step).")
        devices = [torch.device("cpu")]
    devices = resolve_devices(gpu_ids, devices)
    if parallelism_type == "auto":
        # unlike GPUs are timed before their free memory is read (auto.read_inventory)
        inventory = read_inventory(lambda g: torch.device("cuda", g["index"]) in devices)
        plan = setup_optimal_parallelism(path, gpus=inventory, width=width, height=height, num_frames=num_frames,
                                         base_precision=settings.base_precision, quantization=settings.quantization,
                                         block_swap=settings.swaps_blocks,
                                         torch_compile=settings.compile_args is not None,
                                         shard_weights=shard_weights, pipeline_branches=pipeline_branches)
        logger.info("auto: %s", plan["reason"])
        # the degrees are left to the workers: they choose per run, so a cfg-1 run uses every GPU
        return load_parallel_pipeline(
            path, plan["parallelism_type"], settings=_with_swap(settings, plan.get("blocks_to_swap", 0)),
            width=width, height=height, num_frames=num_frames,
            devices=[torch.device("cuda", i) for i in plan["gpu_ids"]] or [torch.device("cpu")],
            blocks_per_gpu=plan.get("blocks_per_gpu"), blocks_to_swap_per_gpu=plan.get("blocks_to_swap_per_gpu"),
            pipeline_branches=pipeline_branches, enable_block_distribution=enable_block_distribution,
            shard_weights=plan["shard_weights"] if shard_weights == "auto" else shard_weights)
    if parallelism_type == "none" or (len(devices) == 1 and parallelism_type != "distributed"):
        if parallelism_type != "none":
            logger.warning("%s with one device (%s) is the plain single-device model.", parallelism_type, devices[0])
        return load_pipeline(path, devices[0], settings)
    if parallelism_type == "distributed":
        from .distributed.pipeline import load_distributed_pipeline
        # CFG and sequence parallelism split the step's activations over the GPUs
        reserve = _activation_reserve(info, settings, width, height, num_frames) // len(devices)
        return load_distributed_pipeline(path, devices, settings, shard_weights=shard_weights, reserve_bytes=reserve)

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
    return pipeline


def _with_swap(settings, blocks_to_swap):
    if not blocks_to_swap or settings.swaps_blocks:
        return settings
    return replace(settings, block_swap=BlockSwapSettings(blocks_to_swap=blocks_to_swap))


def _activation_reserve(info, settings, width, height, num_frames):
    """Bytes each device keeps free for activations (the planner's estimate, two branches)."""
    try:
        return activation_reserve_bytes(info, settings.base_precision, settings.quantization, width, height, num_frames)
    except Exception as error:  # the estimate is advisory; capacities then use all free memory
        logger.debug("No activation estimate: %s", error)
        return 0
