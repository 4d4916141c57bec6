"""The planner's sharded option: the distributed strategy with each GPU holding 1/N of the weights.

plan.py calls `plan_sharded_distributed` when a whole copy of the model fits none of the GPUs
(so neither replicas nor one GPU can run it) and weighs it against block distribution, which runs
the GPUs in turn, by estimated step time (plan_cost.py): with sharding every GPU works on every
step, but each gathers (N - 1) / N of the weights per forward, which over a slow link (PCIe
through host memory) can take longer than the compute it spares. (A module of its own beside plan.py, which
imports it where it is used: plan.py is at its size limit.)

Memory per GPU, on top of plan.py's model (module docstring there):

    weights      weight_bytes / N: this rank's rows of every parameter (distributed/sharding.py);
    gathered     SHARD_GATHERED_BLOCKS whole blocks: the block running and the next one, whose
                 all-gather is issued while the first computes (FSDP2 forward prefetch), plus the
                 embeddings and the head, gathered for the whole forward (the root FSDP unit);
    activations  plan.py's estimate for one CFG group's items with the tokens split over its GPUs;
    runtime      RUNTIME_RESERVE_BYTES.
"""
import math

from .distributed.sharding import fsdp2_missing
from .plan import (RUNTIME_RESERVE_BYTES, cfg_split_text, make_plan, usable_memory, worker_activation_bytes,
                   worker_degrees)
from .plan_cost import gb, gib, link_note, speeds_note

SHARD_GATHERED_BLOCKS = 2


def estimate_sharded_bytes(footprint, activation_bytes, world_size):
    """Peak bytes on each of `world_size` GPUs sharing the weights (see the module docstring)."""
    return (math.ceil(footprint.weight_bytes / world_size) + SHARD_GATHERED_BLOCKS * footprint.block_bytes
            + footprint.embedding_bytes + footprint.head_bytes + activation_bytes + RUNTIME_RESERVE_BYTES)


def plan_sharded_distributed(footprint, work, gpus, need, costs):
    """(plan, Estimate): the 'distributed' plan with shard_weights 'on' whose estimated step is the
    shortest (plan_cost.StepCosts.sharded: compute, or the weights' gather over the slowest link where
    that takes longer, plus the sequence exchange) among the worlds of two or more GPUs (fastest,
    then largest free memory first) on which a 1/N shard plus activations fits each; on a tie the
    larger world. None when not even two GPUs suffice, or when this PyTorch has no FSDP2."""
    if fsdp2_missing():
        return None
    ranked = sorted(gpus, key=lambda g: (costs.speeds.get(g["index"], 1.0), usable_memory(g)), reverse=True)
    options = []
    for world in range(len(gpus), 1, -1):
        degrees = worker_degrees(world, footprint.num_heads, work)  # the workers' own layout
        nbytes = estimate_sharded_bytes(footprint, worker_activation_bytes(footprint, work, degrees), world)
        chosen = [g for g in ranked if nbytes <= usable_memory(g)][:world]
        if len(chosen) == world:
            options.append((costs.sharded(chosen, degrees.cfg, degrees.ulysses, degrees.ring), -world, degrees,
                            chosen, nbytes))
    if not options:
        return None
    time_estimate, _, degrees, chosen, estimate = min(options, key=lambda o: (o[0].seconds, o[1]))
    world, cfg_degree, ulysses, ring = degrees.world_size, degrees.cfg, degrees.ulysses, degrees.ring
    shards = degrees.sequence
    chosen = sorted(chosen, key=lambda g: g["index"])
    forwards = costs.forwards_per_step(cfg_degree)
    split = [cfg_split_text(work)] if cfg_degree > 1 else []
    if shards > 1:
        split.append(f"the {work.tokens} tokens over {shards} GPUs (ulysses {ulysses} x ring {ring})")
    idle = len(gpus) - world
    return make_plan(footprint, "distributed", chosen, [estimate] * world, ulysses=ulysses, ring=ring,
                     cfg_degree=cfg_degree, shard_weights="on",
                     reason=f"{need}: a whole copy fits none of the GPUs, but 1/{world} of the weights does. "
                            f"{world} worker processes each keep 1/{world} of every weight "
                            f"({gib(footprint.weight_bytes / world)}) and gather each block from the others just "
                            f"before it runs, the next block's gather overlapping the current block's compute (FSDP2): "
                            f"{gib(estimate)} per GPU. They share every step ({' and '.join(split)}), where block "
                            f"distribution would run the GPUs in turn; the price is one gather of the weights per "
                            f"forward "
                            f"({gb(footprint.weight_bytes * (world - 1) / world)} received by each GPU"
                            + (", twice a step: cond, then uncond" if forwards > 1 else "") + ")."
                            + f" Estimated {time_estimate.text()}."
                            + (f" {idle} GPU{'s stay' if idle > 1 else ' stays'} idle: too little memory for a "
                               "shard, or too slow a GPU or link to gain from more." if idle else "")
                            + link_note(chosen) + speeds_note(costs, chosen)), time_estimate
