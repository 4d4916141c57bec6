"""The planner's front: a checkpoint (or its header) and this machine's GPUs -> the plan to load with.

plan.py holds the memory model and the decisions (plan_pair.py for a Wan 2.2 A14B expert pair);
this module only gathers what they need: the CheckpointInfo (read from the file's header, no
weights) and the GPU inventory (wanvideo.gpus), and checks given GPUs against a model's plan.
"""
import logging
import os

from ..checkpoint import CheckpointInfo, inspect_checkpoint
from ..devices import parse_gpu_ids
from ..gpus import GIB, discovery, relative_speeds, validate_gpu_setup
from .plan import plan_parallelism, usable_memory

logger = logging.getLogger(__name__)

__all__ = ["get_optimal_gpu_config", "setup_optimal_parallelism", "validate_model_setup", "read_inventory"]


def _checkpoint_info(checkpoint_info_or_path):
    if isinstance(checkpoint_info_or_path, CheckpointInfo):
        return checkpoint_info_or_path
    return inspect_checkpoint(os.fspath(checkpoint_info_or_path))


def get_optimal_gpu_config(checkpoint_info_or_path, gpus=None, width=832, height=480, num_frames=81,
                           base_precision="bf16", quantization="disabled", cfg=True, batch_size=1, block_swap=False,
                           torch_compile=False, shard_weights="auto", low_noise_model=None, pipeline_branches=True):
    """The parallelism plan for this checkpoint on these GPUs -> dict for the loader.

    Reads only the checkpoint header. Keys: parallelism_type ('none', 'data_parallel',
    'block_distribution', 'distributed'), gpu_ids, base_precision, quantization, blocks_to_swap,
    blocks_to_swap_per_gpu, blocks_per_gpu, ulysses_degree, ring_degree, cfg_degree,
    estimated_memory_per_gpu (bytes, in gpu_ids order), shard_weights ('on': distributed with each
    GPU holding 1/N of the weights; 'off' otherwise) and reason. gpus: an inventory as from
    wanvideo.gpus.get_gpu_info() (None: read it now, after timing unlike GPUs, so that the speed
    probe's CUDA context and cache are not counted as free memory: see read_inventory).
    block_swap, torch_compile: whether the loader asks for them (they rule out the distributed
    strategy). shard_weights: 'off' keeps the planner from sharding the weights ('auto', 'on': it
    may). pipeline_branches: the loader's (default on, as the node's): whether block distribution
    pipelines the step's items through its GPUs, which its step-time estimate counts. See plan.py
    for the memory model.
    low_noise_model: a Wan 2.2 A14B low-noise expert (path or CheckpointInfo); the checkpoint is then
    the high-noise one and the plan is the pair's (plan_pair.py: parallelism_type 'none',
    'expert_parallel' or 'distributed', with each expert's plan under 'experts').
    """
    info = _checkpoint_info(checkpoint_info_or_path)
    gpus = read_inventory() if gpus is None else gpus
    workload = dict(width=width, height=height, num_frames=num_frames, base_precision=base_precision,
                    quantization=quantization, cfg=cfg, batch_size=batch_size, block_swap=block_swap,
                    torch_compile=torch_compile, shard_weights=shard_weights, pipeline_branches=pipeline_branches)
    if low_noise_model is not None:
        from .plan_pair import plan_expert_pair  # loads the expert machinery only for a pair
        return plan_expert_pair(info, _checkpoint_info(low_noise_model), gpus, **workload)
    return plan_parallelism(info, gpus, **workload)


def read_inventory(keep=None, gpus=None):
    """This machine's GPUs for a plan: those `keep(gpu)` accepts (None: all) of `gpus` (None: read
    here, get_gpu_info). The planner times
    unlike GPUs (wanvideo.gpus.speed), which creates a CUDA context on each and leaves what the
    probe's matmuls cached until emptied: so they are timed first (the figure stays cached in this
    process, and the planner does not probe again) and the free memory is read afterwards. Callers
    that pass an inventory of their own read its free memory before any probe: the probe then hands
    PyTorch's cache back (torch.cuda.empty_cache), and its CUDA contexts are what the planner's
    RUNTIME_RESERVE_BYTES keeps room for. The inventory is read again only where a probe may have run
    (not for GPUs of one model, nor speeds given in the inventory)."""
    select = (lambda gpus: [g for g in gpus if keep(g)]) if keep is not None else list
    chosen = select(discovery.get_gpu_info() if gpus is None else gpus)
    _, source = relative_speeds(chosen)
    return select(discovery.get_gpu_info()) if source in ("measured", "not measured") else chosen


def _over_budget(plan, by_index):
    """'GPU 1 (23.5 GiB planned, 22.3 GiB usable)' for each GPU a plan (or an expert's plan) overfills."""
    over = {}
    for p in [plan, *plan.get("experts", {}).values()]:
        for i, need in zip(p["gpu_ids"], p["estimated_memory_per_gpu"]):
            if need > usable_memory(by_index[i]):
                over[i] = max(need, over.get(i, 0))
    return [f"GPU {i} ({need / GIB:.1f} GiB planned, {usable_memory(by_index[i]) / GIB:.1f} GiB usable)"
            for i, need in sorted(over.items())]


def validate_model_setup(gpu_ids, model, low_noise_model=None, gpus=None, **workload):
    """Can these GPUs run this model (or this A14B pair: `model` high-noise, `low_noise_model`
    low-noise) at this workload? -> (is_valid, message). The GPU ids are checked as
    validate_gpu_setup does; then the model is planned on just those GPUs (get_optimal_gpu_config's
    workload arguments) and refused when even that plan overfills a GPU. The message names the model
    and the plan."""
    read_here = gpus is None
    gpus = discovery.get_gpu_info() if read_here else gpus
    ok, message = validate_gpu_setup(gpu_ids, gpus=gpus)
    if not ok:
        return ok, message
    ids = set(parse_gpu_ids(gpu_ids))
    chosen = (read_inventory(lambda g: g["index"] in ids, gpus) if read_here  # free memory read after the speed probe
              else [g for g in gpus if g["index"] in ids])
    plan = get_optimal_gpu_config(model, gpus=chosen, low_noise_model=low_noise_model, **workload)
    by_index = {g["index"]: g for g in chosen}
    over = _over_budget(plan, by_index)
    if over:
        return False, (f"{message} But the plan for the model does not fit: {'; '.join(over)}. {plan['reason']} "
                       "Use more or larger GPUs, fp8 quantization, or a smaller video.")
    return True, f"{message} Plan: {plan['parallelism_type']} on GPUs {plan['gpu_ids']}. {plan['reason']}"


def setup_optimal_parallelism(model_path, **settings):
    """get_optimal_gpu_config(model_path, **settings), logged: the plan to hand to the loader."""
    config = get_optimal_gpu_config(model_path, **settings)
    logger.info("Parallelism plan: %s on GPUs %s. %s", config["parallelism_type"], config["gpu_ids"] or "none (CPU)",
                config["reason"])
    return config
