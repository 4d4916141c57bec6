"""Self-attention over a token sequence sharded across ranks: Ulysses all-to-all and ring attention.

`SequenceParallelAttention` has the signature of the model's attention op,
q, k, v [B, Ls, H, Dh] (this rank's sequence shard) -> [B, Ls, H, Dh], and computes exactly what the
op would compute on the full sequence:

  1. Ulysses: an all-to-all within the Ulysses group turns the sequence shards into head shards,
     [B, Ls, H, Dh] -> [B, Ls * ulysses, H / ulysses, Dh]; q, k and v travel packed in one all-to-all.
     Heads that do not divide by the degree are zero-padded (a zero query/key/value head attends
     uniformly to zero values: its output is zero, and it is dropped on the way back).
  2. Ring: with ring degree R > 1, the K/V chunk is passed around the ring group while every rank
     attends its queries to each chunk in turn, merging the partial results with their
     log-sum-exp (online softmax), so the result equals attention over all keys.
  3. The reverse all-to-all restores the sequence shard.

Padding keys (key_mask False) take no part anywhere; the mask shards are all-gathered once per
forward (all blocks share one mask) so each rank knows which keys it attends to are real. When the
padding sits at the end of the sequence for the whole batch (sequence-parallel padding, batch of
one) the padding keys are cut off instead of masked, so fused kernels without mask support apply.

The ring's partial attentions follow the model's attention mode: with 'sage_triton' they come from the
8-bit kernel, which returns the log-sum-exp itself (where it runs: CUDA, head dim 128); with 'auto',
from whichever of it and PyTorch's fused kernels measured faster for the chunk's shape; otherwise
from PyTorch's kernels.
"""
import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...modules.attention import auto_choice, op_backend, sage_triton_runs_on

logger = logging.getLogger(__name__)

# Bound on the score matrix of the exact fallback (elements), so long sequences do not run out of memory.
_MATH_SCORE_ELEMENTS = 1 << 26
_fast_path_failures = set()


# --- attention that also returns its log-sum-exp --------------------------------------------------

def _math_attention_with_lse(q, k, v, key_mask):
    """Exact attention in float32, queries in chunks. q [B, H, Lq, D], k/v [B, H, Lk, D] -> (out, lse)."""
    q, k, v = q.float(), k.float(), v.float()
    scale = 1.0 / math.sqrt(q.shape[-1])
    chunk = max(1, _MATH_SCORE_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, start:start + chunk], k.transpose(-1, -2)) * scale
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None])
        outs.append(torch.matmul(weights, v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _additive_bias(key_mask, q, align=1):
    """bool [B, Lk] -> float [B, 1, 1, Lk] of 0 / -inf in q's dtype; its rows start `align`-aligned
    (the memory-efficient CUDA kernel wants bias rows on 16-element boundaries)."""
    batch, keys = key_mask.shape
    storage = torch.zeros(batch, 1, 1, -(-keys // align) * align, dtype=q.dtype, device=q.device)
    return storage[..., :keys].masked_fill(~key_mask[:, None, None, :], float("-inf"))


def _fast_attention_with_lse(q, k, v, key_mask):
    """PyTorch's fused kernels that return the log-sum-exp. q [B, H, Lq, D] -> (out, lse) or None."""
    if q.device.type == "cpu":
        bias = None if key_mask is None else _additive_bias(key_mask, q)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias)
    if q.device.type == "cuda":
        if key_mask is None and q.dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
            return out, lse
        bias = None if key_mask is None else _additive_bias(key_mask, q, align=16).expand(
            -1, q.shape[1], q.shape[2], -1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
        return out, lse[..., :q.shape[2]]  # the kernel pads its lse rows to a multiple of 32
    return None


def _sage_attention_with_lse(q, k, v, key_mask):
    """attention_with_lse through the sage_triton kernel (q [B, Lq, H, 128] on CUDA)."""
    from ...modules import sage_triton  # imports triton: only when this backend runs
    out, lse = sage_triton.sage_attention(q, k, v, key_mask, return_lse=True)  # empty rows: 0 and -inf
    return out.float(), lse


def attention_with_lse(q, k, v, key_mask=None, fused=True, backend="sdpa"):
    """Attention and its log-sum-exp, for merging partial attentions.

    q [B, Lq, H, D], k/v [B, Lk, H, D], key_mask bool [B, Lk] (True = attend) or None ->
    (out [B, Lq, H, D] float32, lse [B, H, Lq] float32). A sample whose keys are all masked gets
    out 0 and lse -inf (it contributes nothing when merged).
    fused: use PyTorch's fused kernels where they exist; False, or a kernel that fails, takes the
    exact float32 math path.
    backend: the model's attention mode. 'sage_triton' uses the 8-bit kernel where it runs (CUDA,
    head dim 128; elsewhere, as for the plain call, PyTorch's kernels); 'auto' uses it where it
    measured faster than PyTorch's kernels for this shape (decided once per shape); other modes, and
    fused=False (the exact path), use PyTorch's.
    """
    if fused and backend == "auto":
        runners = {"sdpa": _torch_attention_with_lse, "sage_triton": _sage_attention_with_lse}
        backend = auto_choice(q, k, v, key_mask, runners, with_lse=True)
    if fused and backend == "sage_triton" and sage_triton_runs_on(q):
        return _sage_attention_with_lse(q, k, v, key_mask)
    return _torch_attention_with_lse(q, k, v, key_mask, fused)


def _torch_attention_with_lse(q, k, v, key_mask, fused=True):
    """attention_with_lse through PyTorch's fused kernels, or the exact float32 math."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    result = None
    key = (q.device.type, q.dtype, key_mask is None)
    if fused and key not in _fast_path_failures:
        try:
            result = _fast_attention_with_lse(qt, kt, vt, key_mask)
        except (RuntimeError, NotImplementedError) as error:
            _fast_path_failures.add(key)
            logger.warning("Fused attention with log-sum-exp failed on %s %s (%s); using the exact float32 path.",
                           q.device, q.dtype, error)
    out, lse = result if result is not None else _math_attention_with_lse(qt, kt, vt, key_mask)
    out, lse = out.float().transpose(1, 2), lse.float()
    if key_mask is not None:  # kernels disagree on fully masked rows (lse 0 or nan): make them empty
        empty = ~key_mask.any(dim=1)
        if empty.any():
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
            out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse


def merge_partial_attention(out, lse, part_out, part_lse):
    """Online-softmax merge of two partial attentions over disjoint key sets.

    out, part_out [B, L, H, D] float32; lse, part_lse [B, H, L] float32 -> merged (out, lse).
    """
    merged_lse = torch.logaddexp(lse, part_lse)
    reference = merged_lse.masked_fill(torch.isinf(merged_lse), 0)  # both empty: weights exp(-inf) = 0
    weight = lambda l: torch.exp(l - reference).transpose(1, 2)[..., None]   # [B, L, H, 1]
    return out * weight(lse) + part_out * weight(part_lse), merged_lse


# --- collectives ----------------------------------------------------------------------------------

def sequence_to_heads(x, degree, group):
    """[B, Ls, H, D] sequence shard -> [B, Ls * degree, H / degree, D] head shard (all-to-all)."""
    b, ls, h, d = x.shape
    send = x.reshape(b, ls, degree, h // degree, d).permute(2, 0, 1, 3, 4).contiguous()  # [dest, B, Ls, h, D]
    received = torch.empty_like(send)                                                     # [source, B, Ls, h, D]
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 0, 2, 3, 4).reshape(b, degree * ls, h // degree, d)


def sequences_to_heads(tensors, degree, group):
    """sequence_to_heads of several [B, Ls, H, D] tensors of one dtype (q, k and v) in ONE all-to-all:
    they are packed side by side into the send buffer, so each rank sends one message per peer."""
    b, ls, h, d = tensors[0].shape
    send = torch.empty(degree, len(tensors), b, ls, h // degree, d, dtype=tensors[0].dtype,
                       device=tensors[0].device)                                          # [dest, n, B, Ls, h, D]
    for i, t in enumerate(tensors):
        send[:, i].copy_(t.reshape(b, ls, degree, h // degree, d).permute(2, 0, 1, 3, 4))
    received = torch.empty_like(send)                                                     # [source, n, B, Ls, h, D]
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4, 5).reshape(len(tensors), b, degree * ls, h // degree, d).unbind(0)


def heads_to_sequence(x, degree, group):
    """[B, Ls * degree, h, D] head shard -> [B, Ls, h * degree, D] sequence shard (all-to-all)."""
    b, length, h, d = x.shape
    send = x.reshape(b, degree, length // degree, h, d).transpose(0, 1).contiguous()  # [dest, B, Ls, h, D]
    received = torch.empty_like(send)                                                  # [source heads, B, Ls, h, D]
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4).reshape(b, length // degree, degree * h, d)


def all_gather_along(x, dim, group, group_size):
    """Concatenate every rank's x along `dim`, in group-rank order."""
    parts = [torch.empty_like(x) for _ in range(group_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class ChunkKeys:
    """Which keys of each ring chunk are real (not padding).

    lengths: list of R ints, the real keys come first in every chunk and every sample (the usual
      case: padding only at the end, the same for the whole batch), so attention can simply use
      the first lengths[r] keys, without a mask (fast kernels stay usable);
    masks: bool [R, B, Lc] otherwise (ragged batches); both None: every key is real.
    """

    def __init__(self, lengths=None, masks=None):
        self.lengths, self.masks = lengths, masks

    @classmethod
    def from_full_mask(cls, full_mask, ring):
        """full_mask bool [B, L] (or None), split into `ring` chunks of L / ring keys."""
        if full_mask is None:
            return cls()
        counts = full_mask.sum(dim=1).tolist()
        real = counts[0]
        if all(c == real for c in counts) and bool(full_mask[:, :real].all()):
            chunk = full_mask.shape[1] // ring
            return cls(lengths=[min(max(real - r * chunk, 0), chunk) for r in range(ring)])
        return cls(masks=full_mask.unflatten(1, (ring, -1)).transpose(0, 1))

    def restrict(self, chunk, k, v):
        """The keys and values of ring chunk `chunk` that take part, and their mask (or None).
        k, v [B, Lc, h, D] -> (k', v' [B, Lc' <= Lc, h, D], mask [B, Lc] or None)."""
        if self.lengths is not None:
            real = self.lengths[chunk]
            return k[:, :real], v[:, :real], None
        return k, v, None if self.masks is None else self.masks[chunk]


class KeyMaskGather:
    """This rank's key-mask shard [B, L / sp] -> ChunkKeys of the full sequence, once per forward.

    One instance is shared by all blocks; the runner hands every block the same shard tensor, so
    the first block gathers and the others reuse the result. Every rank takes the same path, which
    keeps the collectives matched.
    """

    def __init__(self, groups):
        self.groups = groups
        self._shard, self._keys = None, ChunkKeys()

    def __call__(self, shard):
        if shard is None:
            return ChunkKeys()
        if shard is not self._shard:
            gathered = all_gather_along(shard.to(torch.uint8), 1, self.groups.sp_group, self.groups.degrees.sequence)
            self._shard, self._keys = shard, ChunkKeys.from_full_mask(gathered.bool(), self.groups.degrees.ring)
        return self._keys


def ring_attention(q, k, v, keys, groups, fused=True, backend="sdpa"):
    """Attention of this rank's queries to the keys of every rank of the ring group.

    q, k, v [B, Lc, h, D]: this rank's ring chunk; keys: ChunkKeys, which keys of each chunk are
    real. K/V travel one step around the ring per iteration (sent to the next rank, received from
    the previous one) while the current chunk is being attended. backend: the model's attention mode
    (attention_with_lse). Returns [B, Lc, h, D] in q's dtype.
    """
    ring_size, ring_rank = groups.degrees.ring, groups.ring_rank
    next_rank = groups.ring_ranks[(ring_rank + 1) % ring_size]
    previous_rank = groups.ring_ranks[(ring_rank - 1) % ring_size]
    kv = torch.stack([k, v]).contiguous()
    out, lse = torch.zeros(q.shape, dtype=torch.float32, device=q.device), None
    for step in range(ring_size):
        pending = None
        if step < ring_size - 1:
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, next_rank, groups.ring_group),
                                              dist.P2POp(dist.irecv, incoming, previous_rank, groups.ring_group)])
        source = (ring_rank - step) % ring_size  # whose chunk this rank holds at this step
        chunk_k, chunk_v, mask = keys.restrict(source, kv[0], kv[1])
        if chunk_k.shape[1] > 0:  # a chunk of padding only adds nothing
            part_out, part_lse = attention_with_lse(q, chunk_k, chunk_v, mask, fused, backend)
            out, lse = (part_out, part_lse) if lse is None else merge_partial_attention(out, lse, part_out, part_lse)
        if pending is not None:
            for request in pending:
                request.wait()
            kv = incoming
    return out.to(q.dtype)


class SequenceParallelAttention:
    """Drop-in `attn_op` for a block's self-attention when its tokens are sharded across the SP group.

    local_op: the op it replaces (used as is when there is no ring: keeps the attention backend; the
    ring computes its partial attentions with that backend where it can: attention_with_lse);
    mask_gather: the KeyMaskGather shared by all blocks.
    """

    def __init__(self, local_op, groups, mask_gather, fused=True):
        self.local_op, self.groups, self.mask_gather, self.fused = local_op, groups, mask_gather, fused
        self.backend = op_backend(local_op) or "sdpa"

    def __call__(self, q, k, v, key_mask=None):
        """q, k, v [B, Ls, H, D] sequence shards; key_mask bool [B, Ls] or None -> [B, Ls, H, D]."""
        degrees, groups = self.groups.degrees, self.groups
        heads = q.shape[2]
        ulysses, ring = degrees.ulysses, degrees.ring
        padded_heads = -(-heads // ulysses) * ulysses
        if ulysses > 1:
            if padded_heads != heads:
                q, k, v = (F.pad(t, (0, 0, 0, padded_heads - heads)) for t in (q, k, v))
            if q.dtype == k.dtype == v.dtype and q.shape == k.shape == v.shape:
                q, k, v = sequences_to_heads((q, k, v), ulysses, groups.ulysses_group)  # one all-to-all
            else:
                q, k, v = (sequence_to_heads(t, ulysses, groups.ulysses_group) for t in (q, k, v))
        keys = self.mask_gather(key_mask)
        if ring > 1:
            out = ring_attention(q, k, v, keys, groups, self.fused, self.backend)
        else:
            k, v, mask = keys.restrict(0, k, v)
            out = self.local_op(q, k, v, key_mask=mask)
        if ulysses > 1:
            out = heads_to_sequence(out, ulysses, groups.ulysses_group)[:, :, :heads]
        return out
