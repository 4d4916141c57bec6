"""Sequence parallelism for a plain WanModel, applied from outside through its two seams.

On every rank of an SP group (each rank holds a full copy of the model and runs the same embed):
  - `model.block_runner` becomes a `SequenceParallelRunner`: it pads the tokens to a multiple of
    the SP size (padding keys masked out of self-attention, so results are exact), keeps this
    rank's shard with its RoPE rotations, mask and (per-token t) modulation rows, runs the blocks
    on the shard and returns it; the model's unembed then calls the runner's `run_head`, which runs
    the head on the shard and all-gathers the head's output (out_dim * prod(patch) numbers per token,
    64 for 16 channels, instead of the dim of the hidden states: 24x less for 1.3B, 80x for 14B);
  - every `block.self_attn.attn_op` becomes a `SequenceParallelAttention` (Ulysses all-to-all,
    ring attention, or both).
Everything else in a block acts token by token, and cross-attention attends to the replicated
text/image tokens, so it runs on the shard unchanged.
"""
import logging

import torch

from .attention import KeyMaskGather, SequenceParallelAttention, all_gather_along

logger = logging.getLogger(__name__)


def _pad_along_tokens(x, padding, value=0):
    """Pad dim 1 of x with `padding` entries of `value` (works for complex and bool tensors)."""
    if padding == 0:
        return x
    shape = list(x.shape)
    shape[1] = padding
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=1)


class SequenceParallelRunner:
    """A block runner that splits tokens along L across the SP group.

    inner_runner: the runner it wraps (the model's previous `block_runner`), called on the shard.
    """

    def __init__(self, groups, inner_runner):
        self.groups, self.inner_runner = groups, inner_runner
        self._shard = None  # (the shard returned last, token count, padding, slice): what run_head needs

    def __call__(self, blocks, tokens, ctx):
        """tokens [B, L, dim] (the same on every rank of the SP group) -> this rank's shard
        [B, ceil(L / sp), dim] of the (padded) tokens; run_head finishes it after the blocks."""
        size, shard_index = self.groups.degrees.sequence, self.groups.sp_rank
        batch, length, _ = tokens.shape
        shard_length = -(-length // size)
        padding = shard_length * size - length
        key_mask = ctx.key_mask
        if padding and key_mask is None:
            key_mask = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        tokens = _pad_along_tokens(tokens, padding)
        rope = _pad_along_tokens(ctx.rope, padding) if ctx.rope.shape[1] == length else ctx.rope
        key_mask = None if key_mask is None else _pad_along_tokens(key_mask, padding, False)
        rows = None if ctx.e0_rows is None else _pad_along_tokens(ctx.e0_rows, padding)  # per-token t (Wan 2.2)

        shard = slice(shard_index * shard_length, (shard_index + 1) * shard_length)
        shard_ctx = ctx.with_tokens(rope[:, shard], None if key_mask is None else key_mask[:, shard].contiguous(),
                                    None if rows is None else rows[:, shard])
        out = self.inner_runner(blocks, tokens[:, shard].contiguous(), shard_ctx)
        self._shard = (out, length, padding, shard)
        return out

    def run_head(self, head, tokens, e, rows=None):
        """The model's head on this rank's shard, then the head's output gathered: tokens as the
        last call returned them, e [B, dim] (or the per-token table), rows [B, L] or None ->
        [B, L, out_dim * prod(patch)]. Tokens that are not that shard go through the head whole."""
        if self._shard is None or tokens is not self._shard[0]:
            return head(tokens, e, rows)
        _, length, padding, shard = self._shard
        self._shard = None
        if rows is not None:  # per-token t: the head's modulation rows sharded like the tokens
            rows = _pad_along_tokens(rows, padding)[:, shard]
        out = head(tokens, e, rows)
        return all_gather_along(out, 1, self.groups.sp_group, self.groups.degrees.sequence)[:, :length]


def apply_sequence_parallel(model, groups, fused_ring_kernels=True):
    """Make `model` (a plain WanModel on this rank) run sequence-parallel over `groups` (ParallelGroups).

    Idempotent: a previous sequence-parallel setup is removed first. An SP size of 1 leaves the
    model plain. Returns the model.
    """
    remove_sequence_parallel(model)
    degrees = groups.degrees
    if degrees.sequence == 1:
        return model
    if model.num_heads % degrees.ulysses and groups.rank == 0:
        padded = -(-model.num_heads // degrees.ulysses) * degrees.ulysses
        logger.warning("%d heads do not divide by the Ulysses degree %d: heads are zero-padded to %d "
                       "(%.0f%% extra attention work). A ring degree avoids it; choose_degrees picks one.",
                       model.num_heads, degrees.ulysses, padded, 100 * (padded / model.num_heads - 1))
    mask_gather = KeyMaskGather(groups)
    for block in model.blocks:
        block.self_attn.attn_op = SequenceParallelAttention(block.self_attn.attn_op, groups, mask_gather,
                                                            fused_ring_kernels)
    model.block_runner = SequenceParallelRunner(groups, model.block_runner)
    logger.debug("Sequence parallel over %s applied", groups)
    return model


def remove_sequence_parallel(model):
    """Undo apply_sequence_parallel (no-op on a plain model). Returns the model."""
    for block in model.blocks:
        if isinstance(block.self_attn.attn_op, SequenceParallelAttention):
            block.self_attn.attn_op = block.self_attn.attn_op.local_op
    if isinstance(model.block_runner, SequenceParallelRunner):
        model.block_runner = model.block_runner.inner_runner
    return model
