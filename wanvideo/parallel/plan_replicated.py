"""The planner's replicated options: every chosen GPU holds the whole model.

plan.py calls `plan_replicated` first when there are two or more GPUs (a module of its own beside
plan.py, which imports it where it is used, as plan_sharded.py). Every layout that fits in memory is
estimated (plan_cost.py) and the fastest taken:

  data parallel     one process, a replica per GPU, the step's items (CFG branches x batch) split:
                    nothing is exchanged inside a step;
  sequence parallel worker processes: the CFG branches on cfg_degree groups and the tokens split by
                    ulysses x ring inside each (at least MIN_TOKENS_PER_SEQUENCE_SHARD per GPU), in
                    the layout the workers choose for each number of GPUs (plan.worker_degrees); its
                    all-to-alls are weighed against the slowest link between its GPUs, and it must
                    beat the best in-process choice by WORKER_PROCESS_GAIN;
  one GPU           the fastest that holds it all, when no layout of several GPUs beats it (unlike
                    GPUs: the shards and item shares are equal, so a group waits for its slowest member).

GPUs are taken fastest first (then by free memory), so a slow GPU is left out when it would hold the
others back more than it adds.
"""
import math

from .plan import (MIN_TOKENS_PER_SEQUENCE_SHARD, cfg_split_text, estimate_single_gpu_bytes, gib, make_plan,
                   usable_memory, worker_activation_bytes, worker_degrees)
from .plan_cost import WORKER_PROCESS_GAIN, link_note, speeds_note


def plan_replicated(footprint, work, gpus, need, costs, worker_processes=True):
    """The fastest replicated plan, or None when the model fits no two GPUs (nor sequence shards)."""
    weights_and_reserve = estimate_single_gpu_bytes(footprint, 0)
    speed = lambda g: costs.speeds.get(g["index"], 1.0)
    ranked = sorted(gpus, key=lambda g: (speed(g), usable_memory(g)), reverse=True)

    def fastest_that_fit(activation, count):
        fitting = [g for g in ranked if weights_and_reserve + activation <= usable_memory(g)]
        return fitting[:count] if len(fitting) >= count else None

    in_process = []  # (estimate, kind, chosen, items per GPU, bytes per GPU)
    for num_gpus in range(1, min(len(gpus), work.items) + 1):
        items_per_gpu = math.ceil(work.items / num_gpus)
        activation = footprint.activation_bytes(work.tokens, items_per_gpu)
        chosen = fastest_that_fit(activation, num_gpus)
        if chosen is not None:
            estimate = costs.single(chosen[0]) if num_gpus == 1 else costs.data_parallel(chosen, items_per_gpu)
            in_process.append((estimate, chosen, items_per_gpu, weights_and_reserve + activation))
    sequence = []  # (estimate, degrees, chosen, bytes per GPU)
    for world in range(2, len(gpus) + 1):
        degrees = worker_degrees(world, footprint.num_heads, work)  # what the workers run on `world` GPUs
        if degrees.sequence < 2 or work.tokens < degrees.sequence * MIN_TOKENS_PER_SEQUENCE_SHARD:
            continue  # CFG groups alone: data parallel does that in one process; or too few tokens a shard
        activation = worker_activation_bytes(footprint, work, degrees)
        chosen = fastest_that_fit(activation, world)
        if chosen is not None:
            estimate = costs.sequence_parallel(chosen, degrees.cfg, degrees.ulysses, degrees.ring)
            sequence.append((estimate, degrees, chosen, weights_and_reserve + activation))
    several = [option for option in in_process if len(option[1]) > 1]
    if not several and not sequence:
        return None  # plan.py's single-GPU (or larger-than-one-GPU) paths say why
    # Fastest first; on a tie the fewer GPUs (less memory taken, nothing idle waiting).
    best_local = min(in_process, key=lambda o: (o[0].seconds, len(o[1])), default=None)
    best_sequence = min(sequence, key=lambda o: (o[0].seconds, len(o[2])), default=None)
    sequence_wins = (best_sequence is not None and worker_processes and
                     (best_local is None or best_sequence[0].seconds * WORKER_PROCESS_GAIN < best_local[0].seconds))
    if sequence_wins:
        return _distributed_plan(footprint, work, gpus, need, costs, *best_sequence)
    if best_local is None:
        return None
    estimate, chosen, items_per_gpu, nbytes = best_local
    declined = ""
    if best_sequence is not None and worker_processes:
        seq_estimate, degrees = best_sequence[:2]
        declined = (f" Sequence parallelism on {degrees.world_size} GPUs was not chosen: with its all-to-all in every "
                    f"block it would take {seq_estimate.text()}, against {estimate.seconds:.2f} s here, and its worker "
                    f"processes must win by {WORKER_PROCESS_GAIN}x. Choose 'distributed' yourself to try it anyway.")
    if len(chosen) == 1:
        return _single_plan(footprint, gpus, need, costs, chosen[0], nbytes, estimate, several, declined)
    return _data_parallel_plan(footprint, work, gpus, need, costs, chosen, items_per_gpu, nbytes, estimate, declined)


def _single_plan(footprint, gpus, need, costs, gpu, nbytes, estimate, several, declined):
    why = ""
    if several:
        other, chosen, _, _ = min(several, key=lambda o: o[0].seconds)
        why = (f" Data parallel on {len(chosen)} GPUs would take about {other.seconds:.2f} s per step against "
               f"{estimate.seconds:.2f} s here: the items are split evenly, so the slowest GPU sets the pace.")
    return make_plan(footprint, "none", [gpu], [nbytes],
                     f"{need}: {gib(nbytes)} in all, which fits GPU {gpu['index']} ({gib(usable_memory(gpu))} "
                     f"usable), the fastest that holds it, so it runs there without block swap.{why}{declined}"
                     + speeds_note(costs, gpus))


def _data_parallel_plan(footprint, work, gpus, need, costs, chosen, items_per_gpu, nbytes, estimate, declined=""):
    chosen = sorted(chosen, key=lambda g: g["index"])
    idle = len(gpus) - len(chosen)
    uneven = work.items % len(chosen) != 0
    return make_plan(footprint, "data_parallel", chosen, [nbytes] * len(chosen),
                     f"{need}. The model fits each GPU ({gib(nbytes)} with {items_per_gpu} item"
                     f"{'s' if items_per_gpu > 1 else ''} per GPU), so each of the {len(chosen)} GPUs holds a replica "
                     f"and runs its share of the {work.items} items: "
                     + (f"about {len(chosen)}x faster per step" if not uneven else
                        f"about {work.items / items_per_gpu:.1f}x faster per step (the items do not divide evenly)")
                     + ", with no communication inside the step and no worker processes"
                     + (" (the CFG branches side by side: CFG parallel)" if work.cfg and work.items == len(chosen)
                        else "")
                     + "."
                     + (f" {idle} GPU{'s stay' if idle > 1 else ' stays'} idle: the {work.tokens} tokens are too few, "
                        f"the memory too small, or the exchange too slow, to split the tokens as well (sequence "
                        f"parallelism wants at least {MIN_TOKENS_PER_SEQUENCE_SHARD} tokens per GPU)." if idle else "")
                     + declined + speeds_note(costs, chosen))


def _distributed_plan(footprint, work, gpus, need, costs, estimate, degrees, chosen, nbytes):
    chosen = sorted(chosen, key=lambda g: g["index"])
    world, cfg_degree, ulysses, ring = degrees.world_size, degrees.cfg, degrees.ulysses, degrees.ring
    shards = degrees.sequence
    split = [cfg_split_text(work)] if cfg_degree > 1 else []
    heads_note = (f"{ulysses} divides the {footprint.num_heads} heads" if ring == 1 else
                  f"Ulysses {ulysses} is the largest divisor of {shards} that divides the {footprint.num_heads} "
                  f"heads; ring attention takes the remaining factor {ring}")
    split.append(f"the {work.tokens} tokens over {shards} GPUs (ulysses {ulysses} x ring {ring}: {heads_note})")
    idle = len(gpus) - world
    return make_plan(footprint, "distributed", chosen, [nbytes] * world, ulysses=ulysses, ring=ring,
                     cfg_degree=cfg_degree,
                     reason=f"{need}. The model fits each GPU ({gib(nbytes)} per GPU once split) and there are more "
                            f"GPUs than items, so {world} worker processes share every step: {' and '.join(split)}. "
                            f"Estimated {estimate.text()}; data parallel could use only {min(len(gpus), work.items)} "
                            f"of the GPUs."
                            + (f" {idle} GPU{'s stay' if idle > 1 else ' stays'} idle: too little memory, too few "
                               f"tokens ({MIN_TOKENS_PER_SEQUENCE_SHARD} per GPU at least), or too slow a GPU or link "
                               f"to gain from more." if idle else "") + link_note(chosen) + speeds_note(costs, chosen))
