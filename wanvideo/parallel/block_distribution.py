"""Block distribution: contiguous ranges of blocks on several devices, activations hopping between.

Embeddings live on the first device and the head on the last. When a step carries several
branches (CFG's cond and uncond, batch items), each device's stage processes them as micro-batches
in a pipeline (GPipe order): while device 1 runs branch 0 through its blocks, device 0 already runs
branch 1 through its own, so two devices are busy at once instead of taking turns.
A stage may also keep some of its blocks in pinned CPU memory (block swap), for models too large
even for all devices together; such a stage runs the branches as one batch, so each swapped block
is uploaded once per step, not once per branch.
"""
import logging

import torch
import torch.nn as nn

from ..devices import device_context

logger = logging.getLogger(__name__)

EMBEDDING_MODULES = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb")


def blocks_per_device_by_memory(num_blocks, capacities, limits=None):
    """Split `num_blocks` into contiguous counts in proportion to `capacities` (bytes free for
    weights, or any relative sizes), none above its entry of `limits` (blocks it can hold; default no
    limit): the rounded-down shares first, then block by block to the device with the most capacity
    per block it would hold. A device may get no block; callers leave it out."""
    limits = list(limits) if limits is not None else [num_blocks] * len(capacities)
    if sum(limits) < num_blocks:
        raise ValueError(f"The devices hold at most {sum(limits)} of the {num_blocks} blocks; add devices, keep "
                         "some blocks in CPU memory (block swap) or use fp8.")
    share = float(sum(capacities))
    counts = [min(limit, int(num_blocks * c / share)) for c, limit in zip(capacities, limits)]
    while sum(counts) < num_blocks:
        open_devices = [i for i in range(len(counts)) if counts[i] < limits[i]]
        counts[max(open_devices, key=lambda i: capacities[i] / (counts[i] + 1))] += 1
    return counts


class _Stage(nn.Module):
    """The blocks one device runs (a view: the blocks stay in model.blocks too)."""

    def __init__(self, device, start, blocks):
        super().__init__()
        self.device, self.start = device, start
        self.blocks = nn.ModuleList(blocks)

    @property
    def stop(self):
        return self.start + len(self.blocks)


def _hop(tensor, device):
    """Move activations to the next stage's device; asynchronous between GPUs (the copy waits for
    the producer on the source's stream, the consumer waits for the copy)."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.device.type == "cuda" and device.type == "cuda")


class PipelinedBlockRunner:
    """A block runner (see WanModel.block_runner) for blocks spread over devices.

    With `pipeline` on and more than one branch in the batch, branches go through the stages as
    micro-batches in GPipe order; otherwise the whole batch goes stage after stage.
    swapped_stages: indices of the stages with block swap. Such a stage waits until every
    micro-batch has reached it and runs them as one batch, so each of its swapped blocks is
    uploaded once per step (per micro-batch it would be uploaded once for each branch); the other
    stages keep pipelining.
    """

    def __init__(self, stages, pipeline=True, swapped_stages=()):
        self.stages, self.pipeline, self.swapped_stages = stages, pipeline, frozenset(swapped_stages)

    def __call__(self, blocks, tokens, ctx):
        micro_batches = tokens.shape[0] if self.pipeline and len(self.stages) > 1 else 1
        if micro_batches == 1:
            return self._run_stages_in_turn(tokens, ctx)
        bounds = [slice(i, i + 1) for i in range(micro_batches)]
        contexts = {}  # (micro-batch, device) -> context moved there once per forward
        states = [tokens[b] for b in bounds]
        done = [0] * len(self.stages)  # micro-batches each stage has finished
        # each tick, stage s takes the next micro-batch that stage s - 1 finished in an earlier tick
        # (GPipe order: tick k runs micro-batch k - s on stage s); later stages first, so each
        # device's queue receives its work as early as the data dependencies allow
        while done[-1] < micro_batches:
            for s in reversed(range(len(self.stages))):
                stage, ready = self.stages[s], micro_batches if s == 0 else done[s - 1]
                if s in self.swapped_stages:  # all micro-batches at once: one upload per swapped block
                    if ready == micro_batches and done[s] == 0:
                        batch = torch.cat([_hop(state, stage.device) for state in states])
                        states = list(self._run_stage(stage, batch, ctx.to(stage.device, non_blocking=True))
                                      .split(1))
                        done[s] = micro_batches
                elif done[s] < ready:
                    m = done[s]
                    key = (m, stage.device)
                    if key not in contexts:
                        contexts[key] = ctx.select(bounds[m]).to(stage.device, non_blocking=True)
                    states[m] = self._run_stage(stage, _hop(states[m], stage.device), contexts[key])
                    done[s] += 1
        return torch.cat(states)

    def _run_stages_in_turn(self, tokens, ctx):
        for stage in self.stages:
            tokens = self._run_stage(stage, _hop(tokens, stage.device), ctx.to(stage.device, non_blocking=True))
        return tokens

    @staticmethod
    def _run_stage(stage, tokens, ctx):
        with device_context(stage.device):
            for block in stage.blocks:
                tokens = block(tokens, ctx)
        return tokens


class BlockDistribution:
    """What distribute_model_blocks did, and how to undo it."""

    def __init__(self, model, stages, swappers, pipeline):
        self.model, self.stages, self.swappers, self.pipeline = model, stages, swappers, pipeline

    def describe(self):
        lines = []
        for i, stage in enumerate(self.stages):
            extras = []
            if i == 0:
                extras.append("embeddings")
            if i == len(self.stages) - 1:
                extras.append("head")
            swapper = self.swappers.get(i)
            swap = f", {len(swapper.swapped_block_indices)} of them swapped from CPU" if swapper else ""
            weights = sum(t.numel() * t.element_size() for t in stage.blocks.state_dict().values()) / 2**30
            lines.append(f"{stage.device}: blocks {stage.start}-{stage.stop - 1}{swap}"
                         f"{' + ' + ' + '.join(extras) if extras else ''} ({weights:.2f} GiB of block weights)")
        mode = "CFG/batch branches pipelined across devices" if self.pipeline else "stages run in turn"
        return "block distribution (" + mode + "):\n  " + "\n  ".join(lines)

    def remove(self):
        """Undo the distribution (on unload): the sequential runner again; swapped blocks stay in CPU
        memory (restoring them to their GPUs first would upload gigabytes only to free them)."""
        for swapper in self.swappers.values():
            swapper.remove(restore_device="cpu")
        from ..modules.model import run_blocks_sequentially
        self.model.block_runner = run_blocks_sequentially


def distribute_model_blocks(model, devices, blocks_per_device=None, pipeline=True, blocks_to_swap_per_device=None,
                            swap_settings=None):
    """Place contiguous block ranges of a loaded `model` on `devices` (embeddings on the first, head
    on the last) and install the pipelined runner. blocks_per_device: counts in device order
    (default: an even split); blocks_to_swap_per_device: how many of each stage's first blocks stay
    in pinned CPU memory (they must be on the CPU when this is called).
    Returns a BlockDistribution (describe(), remove())."""
    devices = [torch.device(d) for d in devices]
    num_blocks = len(model.blocks)
    counts = blocks_per_device or blocks_per_device_by_memory(num_blocks, [1] * len(devices))
    if len(counts) != len(devices) or sum(counts) != num_blocks or min(counts) < 1:
        raise ValueError(f"blocks_per_device {counts} must give each of the {len(devices)} devices at least one "
                         f"block and add up to the model's {num_blocks} blocks.")
    swaps = blocks_to_swap_per_device or [0] * len(devices)
    for name in EMBEDDING_MODULES:
        if hasattr(model, name):
            getattr(model, name).to(devices[0])
    model.head.to(devices[-1])
    stages, start, swappers = [], 0, {}
    for i, (device, count) in enumerate(zip(devices, counts)):
        stage = _Stage(device, start, model.blocks[start:start + count])
        if swaps[i]:
            from ..engine import BlockSwapSettings, enable_block_swap
            settings = BlockSwapSettings(**dict(vars(swap_settings) if swap_settings else {},
                                                blocks_to_swap=swaps[i], offload_txt_emb=False, offload_img_emb=False))
            swappers[i] = enable_block_swap(stage, device, settings)
        else:
            stage.to(device)
        stages.append(stage)
        start += count
    model.block_runner = PipelinedBlockRunner(stages, pipeline, swapped_stages=swappers)
    distribution = BlockDistribution(model, stages, swappers, pipeline)
    logger.info("%s", distribution.describe())
    return distribution
