"""Who goes where: checkpoint sizes x GPU memory -> a parallelism plan.

`plan_parallelism(info, gpus, ...)` reads nothing but the CheckpointInfo (the safetensors header) and
an inventory of GPUs (dicts with index, free_memory, total_memory; see wanvideo.gpus.get_gpu_info)
and returns a plain dict the loader accepts as is, with a `reason` that says why. Among the layouts
that fit, the step-time estimates of plan_cost.py (compute at each GPU's speed, traffic over the
link between the GPUs, wanvideo.gpus.links) choose; tokens follow the model's own VAE (the
TI2V-5B's packs 16x16 pixels per latent, Wan 2.1's and the A14B experts' 8x8).

Memory model, per GPU, in bytes (every figure is in the plan's `estimated_memory_per_gpu`):

    weights      the bytes of the blocks placed there (CheckpointInfo.bytes_at) + embeddings on the
                 first GPU + the head on the last;
    swap buffers SWAP_BUFFER_BLOCKS blocks in flight when blocks are swapped from CPU memory;
    activations  items x tokens x elements per token x bytes of the compute dtype, where
                   tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
                   items  = batch_size x 2 with CFG (cond and uncond run as one batch), else batch_size
                   elements per token = ALLOCATOR_SLACK x max(SELF_ATTENTION_PEAK_DIMS x dim,
                                                             FFN_PEAK_DIMS x dim + 2 x ffn_dim)
                 The two terms are the two peaks of a block: in self-attention the residual stream,
                 the modulated input, q, k, v, the float32 RoPE temporaries (2 elements each) and the
                 attention output; in the FFN the residual stream, its input and output and the hidden
                 layer before and after GELU. Flash / memory-efficient attention adds only float32
                 statistics per head and token (ATTENTION_STATS_BYTES). ALLOCATOR_SLACK covers what
                 PyTorch's caching allocator reserves beyond the live tensors;
                 sequence parallel divides the tokens by ulysses x ring and the items by cfg_degree,
                 and adds SEQUENCE_PARALLEL_BUFFER_DIMS x dim elements per local token for the
                 all-to-all / ring send and receive buffers;
    runtime      RUNTIME_RESERVE_BYTES for the CUDA context, cuBLAS workspaces and allocator slack.

A GPU offers its free memory less FREE_MEMORY_MARGIN of its total (other programs grow, the
allocator fragments).

Calibration (one bf16 forward of the real architecture with random weights, H100, PyTorch 2.11, SDPA
flash attention; GiB above the weights, live peak / reserved by the allocator):
    1.3B 480p 81 frames, 1 item: 1.52 / 2.03     14B 480p 81 frames, 1 item: 2.96 / 4.38
    1.3B 480p 81 frames, 2 items: 2.96 / 3.79    14B 480p 81 frames, 2 items: 5.90 / 8.56
    1.3B 720p 81 frames, 2 items: 6.82 / 8.41    14B 720p 81 frames, 1 item: 6.82 / 9.76
                                                 14B 720p 81 frames, 2 items: 13.60 / 18.68
The estimate is 1.01-1.16x the reserved figure and 1.4-1.5x the live peak.
"""
import logging
import math

import torch

from ..checkpoint import BASE_DTYPES
from ..gpus.speed import relative_speeds
from ..quantization import QUANTIZATION_MODES
from .block_distribution import blocks_per_device_by_memory
from .distributed.topology import choose_degrees
from .plan_cost import GIB, WORKER_PROCESS_GAIN, StepCosts, gib, link_note, speeds_note

logger = logging.getLogger(__name__)

RUNTIME_RESERVE_BYTES = 1 * GIB
FREE_MEMORY_MARGIN = 0.05
SWAP_BUFFER_BLOCKS = 2            # offload's ring at prefetch_blocks=1: the block running, the one uploading
SELF_ATTENTION_PEAK_DIMS = 10     # live elements per token in self-attention, in units of dim
FFN_PEAK_DIMS = 5                 # live elements per token in the FFN besides its 2 x ffn_dim hidden layer
ALLOCATOR_SLACK = 1.35            # reserved / live peak of the caching allocator: 1.23 to 1.48 measured
ATTENTION_STATS_BYTES = 4         # float32 log-sum-exp per head and token (flash attention)
SEQUENCE_PARALLEL_BUFFER_DIMS = 4
MIN_TOKENS_PER_SEQUENCE_SHARD = 2048   # heuristic (not yet measured): smaller shards leave each layer's
                                       # exchange a large share of its compute
VAE_STRIDE = (4, 8, 8)            # Wan VAE: 4x in time (first frame kept), 8x in height and width

PLAN_KEYS = ("parallelism_type", "gpu_ids", "base_precision", "quantization", "blocks_to_swap",
             "blocks_to_swap_per_gpu", "blocks_per_gpu", "ulysses_degree", "ring_degree", "cfg_degree",
             "estimated_memory_per_gpu", "shard_weights", "reason")


def latent_token_count(width, height, num_frames, patch_size=(1, 2, 2), vae_stride=VAE_STRIDE):
    """Tokens of one video: ((frames - 1) // 4 + 1) * (height // 16) * (width // 16) for Wan 2.1 and the
    A14B experts (VAE stride (4, 8, 8), 2x2 patches); the TI2V-5B's Wan 2.2 VAE packs 16x16 pixels
    (vae_stride (4, 16, 16)): (height // 32) * (width // 32) per latent frame."""
    for name, value, minimum in (("width", width, 16), ("height", height, 16), ("num_frames", num_frames, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}={value!r} is not valid: give an integer of at least {minimum}.")
    latent_frames = (num_frames - 1) // vae_stride[0] + 1
    pf, ph, pw = patch_size
    return (latent_frames // pf) * (height // vae_stride[1] // ph) * (width // vae_stride[2] // pw)


class ModelFootprint:
    """Sizes of one model in one precision: what the planner places.

    block_bytes: one transformer block; embedding_bytes: patch/text/time embeddings and img_emb
    (they go with the first block); head_bytes: the output head (goes with the last block).
    """

    def __init__(self, info, base_precision="bf16", quantization="disabled"):
        if base_precision not in BASE_DTYPES:
            raise ValueError(f"base_precision {base_precision!r} is not one of {', '.join(BASE_DTYPES)}.")
        if quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATION_MODES)}.")
        config = info.config
        self.base_precision, self.quantization = base_precision, quantization
        self.compute_bytes = BASE_DTYPES[base_precision].itemsize
        self.block_bytes, outside_blocks = info.bytes_at(BASE_DTYPES[base_precision], quantization)
        self.num_layers, self.dim, self.ffn_dim = config["num_layers"], config["dim"], config["ffn_dim"]
        self.num_heads, self.text_len = config["num_heads"], config.get("text_len", 512)
        head_elements = (config["dim"] * math.prod(config["patch_size"]) * config["out_dim"]
                         + math.prod(config["patch_size"]) * config["out_dim"] + 2 * config["dim"])
        self.head_bytes = head_elements * self.compute_bytes
        self.embedding_bytes = outside_blocks - self.head_bytes
        self.patch_size, self.vae_stride = tuple(config["patch_size"]), tuple(info.vae_stride)
        self.description = info.model_name  # 'Wan 2.1 t2v 14B', 'Wan 2.2 TI2V 5B', ...

    @property
    def weight_bytes(self):
        return self.num_layers * self.block_bytes + self.embedding_bytes + self.head_bytes

    def activation_bytes(self, tokens, items, sequence_shards=1):
        """Peak activation bytes of one forward of `items` videos of `tokens` tokens on one GPU,
        with the tokens split over `sequence_shards` GPUs."""
        local_tokens = math.ceil(tokens / sequence_shards)
        elements = max(SELF_ATTENTION_PEAK_DIMS * self.dim, FFN_PEAK_DIMS * self.dim + 2 * self.ffn_dim)
        if sequence_shards > 1:
            elements += SEQUENCE_PARALLEL_BUFFER_DIMS * self.dim
        per_item = local_tokens * (ALLOCATOR_SLACK * elements * self.compute_bytes
                                   + self.num_heads * ATTENTION_STATS_BYTES)
        per_item += 4 * self.text_len * self.dim * self.compute_bytes  # text context, its k and v per block
        return int(items * per_item)


def usable_memory(gpu):
    """Bytes the planner may fill on this GPU: free memory less a margin of its total."""
    return int(gpu["free_memory"] - FREE_MEMORY_MARGIN * gpu["total_memory"])


def estimate_single_gpu_bytes(footprint, activation_bytes, blocks_to_swap=0):
    """Peak bytes on one GPU holding the whole model with `blocks_to_swap` blocks kept in CPU memory."""
    resident = footprint.num_layers - blocks_to_swap
    in_flight = min(blocks_to_swap, SWAP_BUFFER_BLOCKS)
    return (footprint.embedding_bytes + footprint.head_bytes + (resident + in_flight) * footprint.block_bytes
            + activation_bytes + RUNTIME_RESERVE_BYTES)


def estimate_block_distribution_bytes(footprint, activation_bytes, blocks_per_gpu, blocks_to_swap_per_gpu=None):
    """Peak bytes per GPU when the blocks are split into contiguous ranges (embeddings on the first
    GPU, head on the last), each GPU swapping `blocks_to_swap_per_gpu[i]` of its blocks."""
    swaps = blocks_to_swap_per_gpu or [0] * len(blocks_per_gpu)
    last = len(blocks_per_gpu) - 1
    return [(blocks - swap + min(swap, SWAP_BUFFER_BLOCKS)) * footprint.block_bytes + activation_bytes
            + RUNTIME_RESERVE_BYTES + (footprint.embedding_bytes if i == 0 else 0)
            + (footprint.head_bytes if i == last else 0)
            for i, (blocks, swap) in enumerate(zip(blocks_per_gpu, swaps))]


def minimal_blocks_to_swap(footprint, activation_bytes, available_bytes):
    """Fewest blocks to keep in CPU memory so one GPU of `available_bytes` runs the model; None if
    even swapping every block is not enough."""
    for blocks_to_swap in range(footprint.num_layers + 1):
        if estimate_single_gpu_bytes(footprint, activation_bytes, blocks_to_swap) <= available_bytes:
            return blocks_to_swap
    return None


def worker_degrees(world_size, num_heads, work):
    """The ParallelDegrees the distributed workers choose for `world_size` ranks and this workload
    (serving.WorkerSession.layout): CFG groups when the guidance scale is not 1, or at cfg 1 when the
    batch is 2n videos of one size (cfg_parallel.splits_in_two), i.e. when the step's items are even."""
    return choose_degrees(world_size, num_heads, use_cfg=work.items % 2 == 0)


def worker_activation_bytes(footprint, work, degrees):
    """A worker's activations in that layout: its CFG group's items, its share of the tokens."""
    return footprint.activation_bytes(work.tokens, work.items // degrees.cfg, degrees.sequence)


def cfg_split_text(work):
    """What two CFG groups of workers split: the branches, or at cfg 1 the batch's two halves."""
    return ("the cond and uncond branches on 2 groups of GPUs (cfg_degree 2)" if work.cfg else
            "the batch's two halves on 2 groups of GPUs (cfg_degree 2)")


def activation_reserve_bytes(info, base_precision, quantization, width, height, num_frames):
    """Bytes each device keeps free for the activations of a CFG step (two branches, batch 1)."""
    footprint = ModelFootprint(info, base_precision, quantization)
    return Workload(footprint, width, height, num_frames, True, 1).full_activation


def check_inventory(gpus):
    """Raise ValueError naming a GPU entry that lacks index, free_memory or total_memory."""
    for gpu in gpus:
        missing = [k for k in ("index", "free_memory", "total_memory") if k not in gpu]
        if missing:
            raise ValueError(f"GPU entry {gpu!r} lacks {', '.join(missing)}; pass dicts as returned by "
                             "wanvideo.gpus.get_gpu_info().")


def make_plan(footprint, parallelism_type, gpus, estimates, reason, blocks_to_swap=0, blocks_to_swap_per_gpu=None,
              blocks_per_gpu=None, ulysses=1, ring=1, cfg_degree=1, shard_weights="off"):
    """The plan dict (PLAN_KEYS) the planner's modules return, JSON-ready."""
    return dict(parallelism_type=parallelism_type, gpu_ids=[int(g["index"]) for g in gpus], shard_weights=shard_weights,
                base_precision=footprint.base_precision, quantization=footprint.quantization,
                blocks_to_swap=int(blocks_to_swap), blocks_to_swap_per_gpu=blocks_to_swap_per_gpu,
                blocks_per_gpu=blocks_per_gpu, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg_degree,
                estimated_memory_per_gpu=[int(e) for e in estimates], reason=reason)


class Workload:
    """What one denoising step processes: tokens per item, items (CFG branches x batch), and the
    activation bytes of the whole step on one device."""

    def __init__(self, footprint, width, height, num_frames, cfg, batch_size):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not valid: give an integer of at least 1.")
        self.tokens = latent_token_count(width, height, num_frames, footprint.patch_size, footprint.vae_stride)
        self.items = batch_size * (2 if cfg else 1)
        self.cfg, self.batch_size = cfg, batch_size
        self.full_activation = footprint.activation_bytes(self.tokens, self.items)
        self.text = (f"{self.items} item{'s' if self.items > 1 else ''} "
                     f"({'cond + uncond' if cfg else 'no CFG'}{f' x batch {batch_size}' if batch_size > 1 else ''})"
                     f" x {self.tokens} tokens ({width}x{height}, {num_frames} frames)")


def plan_parallelism(info, gpus, width=832, height=480, num_frames=81, base_precision="bf16",
                     quantization="disabled", cfg=True, batch_size=1, block_swap=False, torch_compile=False,
                     shard_weights="auto", pipeline_branches=True):
    """CheckpointInfo + GPU inventory -> plan dict (see PLAN_KEYS and the module docstring).

    Order of preference: replicas when the model fits each of two or more GPUs (plan_replicated.py:
    data parallel, sequence parallel or the fastest single GPU, whichever the step-time estimate of
    plan_cost.py says is fastest, traffic weighed against the GPUs' link); else one GPU when it
    fits one; else the distributed strategy with the weights sharded over the GPUs when 1/N of them
    fits each (plan_sharded.py; not with shard_weights 'off') or block distribution over the GPUs
    (with swap if even their sum is too small), by estimated step time; else one GPU with block swap.
    GPUs of different models are weighed by relative speed (wanvideo.gpus.speed: given as
    'relative_speed' in the inventory, else probed and cached).
    block_swap, torch_compile: the loader asks for them (its Block Swap / Torch Compile inputs).
    The distributed strategy's workers support neither, so it is then not chosen and the reason
    says what it would have been. pipeline_branches: the loader's (default on): block distribution
    pipelines the step's items through its stages, else they take the whole batch in turn.
    """
    plan = _choose_plan(info, gpus, width, height, num_frames, base_precision, quantization, cfg, batch_size,
                        shard_weights=shard_weights, pipeline_branches=pipeline_branches)
    why = workers_refused(block_swap, torch_compile)
    if plan["parallelism_type"] != "distributed" or not why:
        return plan
    in_process = _choose_plan(info, gpus, width, height, num_frames, base_precision, quantization, cfg, batch_size,
                              worker_processes=False, pipeline_branches=pipeline_branches)
    refused = (f"with the weights sharded over {len(plan['gpu_ids'])} GPUs" if plan["shard_weights"] == "on" else
               f"sequence parallel on {len(plan['gpu_ids'])} GPUs")
    in_process["reason"] += f" (The distributed strategy, {refused}, would be faster, but {why}.)"
    return in_process


NO_NCCL = ("this PyTorch has no NCCL (as on Windows), which its worker processes need to join GPUs; "
           "data_parallel, block_distribution and expert_parallel run in one process and need none")


def nccl_available():
    """False where CUDA is there but NCCL is not (Windows builds of PyTorch): no distributed on GPUs."""
    if not torch.cuda.is_available():
        return True  # no GPU here: plans are for an injected inventory (tests, --gpus); nothing to refuse
    return torch.distributed.is_available() and torch.distributed.is_nccl_available()


def workers_refused(block_swap=False, torch_compile=False):
    """Why the distributed strategy's worker processes cannot run here, or '' when they can: they
    support neither block swap nor torch.compile, and need NCCL (nccl_available). Shared by
    plan_parallelism and the expert pair's placement (experts.pair_placement)."""
    asked = " and ".join(name for name, on in (("block swap", block_swap), ("torch.compile", torch_compile)) if on)
    if asked:
        return (f"its worker processes do not combine with {asked}, which the loader asks for: disconnect that input "
                "to use it")
    return "" if nccl_available() else NO_NCCL


def _choose_plan(info, gpus, width, height, num_frames, base_precision, quantization, cfg, batch_size,
                 worker_processes=True, shard_weights="auto", pipeline_branches=True):
    """plan_parallelism's choice; worker_processes=False leaves the distributed strategy out."""
    footprint = ModelFootprint(info, base_precision, quantization)
    work = Workload(footprint, width, height, num_frames, cfg, batch_size)
    check_inventory(gpus)
    need = (f"{footprint.description} in {base_precision}"
            f"{' with ' + quantization + ' blocks' if quantization != 'disabled' else ''} needs "
            f"{gib(footprint.weight_bytes)} of weights and {gib(work.full_activation)} of activations for "
            f"{work.text}")
    if not gpus:
        return make_plan(footprint, "none", [], [], f"No CUDA GPU was found, so the model runs on the CPU ({need}; "
                         "many times slower than a GPU). Install the NVIDIA driver and a CUDA build of PyTorch, or "
                         "check CUDA_VISIBLE_DEVICES, to use a GPU.")
    speeds, speed_source = relative_speeds(gpus)
    costs = StepCosts(footprint, work, speeds, speed_source, pipelined=pipeline_branches)
    single_bytes = estimate_single_gpu_bytes(footprint, work.full_activation)
    fitting = sorted((g for g in gpus if single_bytes <= usable_memory(g)),
                     key=lambda g: (speeds.get(g["index"], 1.0), usable_memory(g)), reverse=True)

    if len(gpus) >= 2:
        from .plan_replicated import plan_replicated  # imports this module, as plan_sharded does
        replicated = plan_replicated(footprint, work, gpus, need, costs, worker_processes)
        if replicated is not None:
            return replicated
    if fitting:
        best = fitting[0]
        why_single = ""
        if len(gpus) >= 2:
            why_single = (" The other GPUs would not speed this up: " +
                          ("the model fits only this one, and block distribution runs the blocks one GPU after "
                           "another, no faster than one GPU." if len(fitting) == 1 else
                           f"there is a single item and only {work.tokens} tokens, too few to split across GPUs "
                           f"(at least {2 * MIN_TOKENS_PER_SEQUENCE_SHARD} are needed).")) + speeds_note(costs, gpus)
        return make_plan(footprint, "none", [best], [single_bytes],
                         f"{need}: {gib(single_bytes)} in all, which fits GPU {best['index']} "
                         f"({gib(usable_memory(best))} usable), so it runs there without block swap.{why_single}")
    sharded = distributed = None
    if len(gpus) >= 2 and worker_processes and shard_weights != "off":
        from .plan_sharded import plan_sharded_distributed  # imports this module: see plan_sharded.py
        sharded = plan_sharded_distributed(footprint, work, gpus, need, costs)
    if len(gpus) >= 2:
        distributed = _plan_block_distribution(footprint, work, gpus, need, costs)
    if sharded and distributed:
        return _sharded_or_blocks(sharded, distributed)
    if sharded or distributed:
        return (sharded or distributed)[0]
    best = max(gpus, key=usable_memory)
    others = [g["index"] for g in gpus if g is not best]
    plural = len(others) > 1
    note = (f" GPU{'s' if plural else ''} {', '.join(map(str, others))} cannot take part: next to the activations "
            f"{'they hold' if plural else 'it holds'} no block, or fewer block bytes than the activation traffic "
            "block distribution would add each step."
            if others else "")
    return _plan_swap(footprint, work, best, need, note)


def _sharded_or_blocks(sharded, blocks):
    """Both fit: weight sharding (worker processes, every GPU on every step, the weights gathered each
    forward) against block distribution (one process, the GPUs in turn or pipelined), by estimated
    step time; sharding must win by WORKER_PROCESS_GAIN."""
    (sharded_plan, sharded_time), (blocks_plan, blocks_time) = sharded, blocks
    if sharded_time.seconds * WORKER_PROCESS_GAIN < blocks_time.seconds:
        sharded_plan["reason"] += (f" Block distribution over {len(blocks_plan['gpu_ids'])} GPUs would take "
                                   f"{blocks_time.text()}.")
        return sharded_plan
    blocks_plan["reason"] += (f" Sharding the weights over {len(sharded_plan['gpu_ids'])} GPUs (distributed) was not "
                              f"chosen: with the weights gathered every forward it would take {sharded_time.text()}, "
                              f"against {blocks_time.seconds:.2f} s here, and its worker processes must win by "
                              f"{WORKER_PROCESS_GAIN}x. Choose 'distributed' with shard_weights 'on' to try it anyway.")
    return blocks_plan


def _fp8_hint(footprint):
    if footprint.quantization != "disabled":
        return ""
    return " fp8 quantization (fp8_e4m3fn) halves the block weights and would need less swapping."


def _plan_swap(footprint, work, gpu, need, note=""):
    available = usable_memory(gpu)
    swap = minimal_blocks_to_swap(footprint, work.full_activation, available)
    if swap is None:
        estimate = estimate_single_gpu_bytes(footprint, work.full_activation, footprint.num_layers)
        return make_plan(footprint, "none", [gpu], [estimate], blocks_to_swap=footprint.num_layers,
                         reason=f"{need}; even with all {footprint.num_layers} blocks swapped to CPU memory GPU "
                                f"{gpu['index']} would need {gib(estimate)} but has {gib(available)} usable: it will "
                                "most likely run out of memory. Lower the resolution or the number of frames, turn CFG "
                                "batching off, or use fp8 quantization." + note)
    estimate = estimate_single_gpu_bytes(footprint, work.full_activation, swap)
    return make_plan(footprint, "none", [gpu], [estimate], blocks_to_swap=swap,
                     reason=f"{need}, more than GPU {gpu['index']} offers ({gib(available)} usable). Keeping {swap} of "
                            f"{footprint.num_layers} blocks in CPU memory and streaming them in during each step "
                            f"brings it to {gib(estimate)}; each swapped block is copied over PCIe every step, so "
                            f"fewer is faster.{_fp8_hint(footprint)}{note}")


def _plan_block_distribution(footprint, work, gpus, need, costs):
    """(plan, Estimate) or None. Contiguous block ranges in proportion to each GPU's memory after its
    fixed costs times its relative speed (costs.speeds; equal GPUs: by memory alone), none above the
    blocks it holds (GPUs that cannot hold a block are left out). If even the sum is too small, every
    GPU but the largest keeps as many blocks as it holds and the largest takes the rest with block
    swap: one GPU paying the swap buffers swaps the fewest blocks."""
    candidates = list(gpus)
    while len(candidates) >= 2:
        last = len(candidates) - 1
        capacities = [usable_memory(g) - work.full_activation - RUNTIME_RESERVE_BYTES
                      - (footprint.embedding_bytes if i == 0 else 0) - (footprint.head_bytes if i == last else 0)
                      for i, g in enumerate(candidates)]
        resident_limits = [max(0, c // footprint.block_bytes) for c in capacities]
        if sum(resident_limits) >= footprint.num_layers:
            shares = [max(0, c) * costs.speeds.get(g["index"], 1.0) for c, g in zip(capacities, candidates)]
            blocks = blocks_per_device_by_memory(footprint.num_layers, shares, resident_limits)
            swaps = [0] * len(blocks)
        else:
            swapper = max(range(len(candidates)), key=lambda i: capacities[i])
            if resident_limits[swapper] < SWAP_BUFFER_BLOCKS:
                return None  # not even room for the blocks in flight
            # A GPU spares the PCIe copies of the blocks it holds but adds a hop of the activations,
            # which crosses PCIe twice without peer-to-peer (GPU -> host -> GPU): worth it only when
            # its blocks outweigh that.
            hop_bytes = 2 * work.items * work.tokens * footprint.dim * footprint.compute_bytes
            not_worth = [g for i, g in enumerate(candidates)
                         if i != swapper and resident_limits[i] * footprint.block_bytes <= hop_bytes]
            if not_worth:
                candidates = [g for g in candidates if g not in not_worth]
                continue
            blocks = list(resident_limits)
            blocks[swapper] = footprint.num_layers - (sum(resident_limits) - resident_limits[swapper])
            swaps = [0] * len(blocks)
            swaps[swapper] = blocks[swapper] - max(0, resident_limits[swapper] - SWAP_BUFFER_BLOCKS)
        if 0 in blocks:  # a GPU too small for a block only adds a hop: leave it out and plan again
            candidates = [g for g, b in zip(candidates, blocks) if b > 0]
            continue
        estimates = estimate_block_distribution_bytes(footprint, work.full_activation, blocks, swaps)
        ranges, start = [], 0
        for g, b in zip(candidates, blocks):
            ranges.append(f"GPU {g['index']}: blocks {start}-{start + b - 1}")
            start += b
        left_out = [g["index"] for g in gpus if g not in candidates]
        estimate = costs.block_distribution(candidates, blocks, swaps)
        mixed = speeds_note(costs, candidates)
        swap_text = (f" Together they are still too small, so {sum(swaps)} blocks of GPU "
                     f"{candidates[swaps.index(max(swaps))]['index']} stay in CPU memory and are streamed in each "
                     f"step.{_fp8_hint(footprint)}" if sum(swaps) else " No block swap is needed.")
        return make_plan(footprint, "block_distribution", candidates, estimates, blocks_to_swap=sum(swaps),
                         blocks_to_swap_per_gpu=swaps if sum(swaps) else None, blocks_per_gpu=blocks,
                         reason=f"{need}: too much for any single GPU, so the {footprint.num_layers} blocks are "
                                f"split in contiguous ranges in proportion to each GPU's free memory after its "
                                f"activations"
                                f"{' times its relative speed' if mixed else ''} "
                                f"({'; '.join(ranges)}); embeddings sit on the first GPU and the head on the last. "
                                + ("With CFG (or a batch) the loader pipelines the branches through the GPUs, so they "
                                   "work at once; a single branch goes through them in turn, about as long as on one "
                                   "GPU that held it all." if costs.pipelined else
                                   "With pipeline_branches off the GPUs take the whole batch in turn, a step about as "
                                   "long as on one GPU that held it all.")
                                + swap_text
                                + (f" GPUs {left_out} are left out: their free memory next to the activations holds "
                                   "no block, or fewer block bytes than the activation traffic they would add each "
                                   "step."
                                   if left_out else "") + mixed + link_note(candidates)), estimate
    return None
