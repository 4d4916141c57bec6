"""The Wan 2.1 and 2.2 diffusion transformer (t2v, i2v, flf2v; Wan 2.2 A14B experts and TI2V-5B).

Parameter names and constructor arguments follow the official Wan releases, so official and
ComfyUI-repackaged checkpoints load with strict key checking, and code written against the
official `WanModel.forward(x, t, context, seq_len, clip_fea=None, y=None)` runs on this one; as in
Wan 2.2, `t` may be [B] or per token [B, seq_len] (TI2V: the clean first frame's tokens at t = 0).

The model is pure architecture and imports nothing of the package above it. Parallel strategies
(`wanvideo/parallel/`) and the single-GPU engine (`wanvideo/engine/`) act on it from outside
through the seams it offers on purpose:
  - `model.blocks`: the block list that block distribution, block swap and sharding place or wrap;
  - `block.self_attn.attn_op`: the one attention call of each block's self-attention, which
    sequence parallelism replaces with a distributed version of the same signature;
  - `model.block_runner(blocks, tokens, ctx)`: runs the blocks between the point where tokens
    enter (after patch embedding) and where they leave (before the head); strategies that split
    tokens or pipeline micro-batches install their own runner. A runner that returns only its
    share of the tokens also offers `run_head(head, tokens, e, e_rows)`, which runs the head on
    that share and gathers the head's output (far smaller than the hidden states);
  - the batch: `model.prefers_batched_cfg` tells the sampler to send CFG's cond and uncond as one
    batch (strategies that split or pipeline the batch set it).
"""
import functools
import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import make_attention_op
from .embeddings import (CLIP_DIM, CLIP_TOKENS, MLPProj, rope_frequencies, rope_params,  # noqa: F401 (re-exported)
                         sinusoidal_embedding_1d)

logger = logging.getLogger(__name__)

__all__ = [
    "WanModel", "BlockContext", "MODEL_TYPES", "run_blocks_sequentially", "sinusoidal_embedding_1d", "rope_params",
    "rope_frequencies",
]

# Official names: Wan 2.1 't2v', 'i2v', 'flf2v'; Wan 2.2 't2v' and 'i2v' (the A14B experts), 'ti2v' (5B)
MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")


def norm_and_rope(x, norm_weight, eps, num_heads, rope):
    """q or k: [B, L, dim] -> RMS-normalised over dim (when norm_weight is given), split into heads
    [B, L, H, Dh], channel pairs rotated by rope [B or 1, L, 1, Dh/2, 2] in float32."""
    if norm_weight is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm_weight.to(x.dtype), eps)
    pairs = x.unflatten(-1, (num_heads, -1, 2)).float()
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[..., 0], rope[..., 1]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).type_as(x)


def _per_token(table, rows):
    """table [B, dim] (one row per sample) when rows is None, else table [R, dim] picked per token
    by rows [B, L] -> broadcastable to [B, L, dim]. Inside a fused kernel the pick is an indexed
    load, so a per-token modulation never exists in memory."""
    return table[:, None] if rows is None else table[rows]


def modulate(x, norm, shift, scale, rows=None):
    """norm(x) * (1 + scale) + shift; x [B, L, dim], shift and scale [B, dim] or, with rows, [R, dim]."""
    return torch.addcmul(_per_token(shift, rows), norm(x), 1 + _per_token(scale, rows))


def gated_residual(x, y, gate, rows=None):
    """x + y * gate; x, y [B, L, dim], gate [B, dim] or, with rows, [R, dim]."""
    return torch.addcmul(x, y, _per_token(gate, rows))


class _FusedOnCuda:
    """Runs `fn` through torch.compile on CUDA tensors (one fused kernel instead of several memory
    passes: RoPE alone costs ~8% of a block in eager mode), eagerly elsewhere or when compiling is
    unavailable. Shapes are static: dynamic-shape kernels index with run-time divisions and ran 5x
    slower on an H100; a new resolution costs one recompile of these small kernels. Compiling and
    calling go through LazyCompile (lazy_compile.py): safe from data_parallel's threads, and off for
    good only when compiling cannot work here; a transient error (out of memory) propagates.
    Set WANVIDEO_FUSED_KERNELS=0 to always run eagerly."""

    def __init__(self, fn):
        from .lazy_compile import LazyCompile
        self.fn = fn
        self.lazy = LazyCompile(fn, f"the fused kernel {fn.__name__}", dynamic=False)
        self.lazy.failed = os.environ.get("WANVIDEO_FUSED_KERNELS", "1") == "0"

    @property
    def failed(self):
        """Whether fn runs eagerly for good (benchmarks/bench_model.py sets it to time the eager block)."""
        return self.lazy.failed

    @failed.setter
    def failed(self, value):
        self.lazy.failed = value

    def __call__(self, x, *args):
        return self.lazy(x, *args)


fused_norm_and_rope = _FusedOnCuda(norm_and_rope)
fused_modulate = _FusedOnCuda(modulate)
fused_gated_residual = _FusedOnCuda(gated_residual)


@dataclass
class BlockContext:
    """Everything a block needs besides the tokens; moves between devices as one piece.

    e0:          [B, 6, dim] float32 timestep modulation, one per sample (t of shape [B]); with
                 e0_rows, a table [R, 6, dim] of the R distinct timesteps of a per-token t
    context:     [B, Lt, dim] embedded text tokens
    context_img: [B, Li, dim] embedded CLIP image tokens (Wan 2.1 i2v / flf2v) or None
    rope:        [B or 1, L, 1, head_dim / 2, 2] cos and sin of the token positions' rotations
    key_mask:    [B, L] bool, False on padding of ragged batches; None when every sample is full
    e0_rows:     [B, L] int64, each token's row of e0 (per-token t, Wan 2.2 TI2V); None for t [B].
                 Laid out along the tokens like rope: a sequence shard takes its slice of it.
    """
    e0: torch.Tensor
    context: torch.Tensor
    context_img: Optional[torch.Tensor]
    rope: torch.Tensor
    key_mask: Optional[torch.Tensor] = None
    e0_rows: Optional[torch.Tensor] = None

    def to(self, device, non_blocking=False):
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return BlockContext(move(self.e0), move(self.context), move(self.context_img), move(self.rope),
                            move(self.key_mask), move(self.e0_rows))

    def select(self, batch_slice):
        """The context of a slice of the batch (for micro-batches and data parallelism)."""
        pick = lambda t: None if t is None else t[batch_slice]
        rope = self.rope if self.rope.shape[0] == 1 else self.rope[batch_slice]  # shared by the batch or per sample
        e0 = pick(self.e0) if self.e0_rows is None else self.e0  # a per-token table serves the whole batch
        return BlockContext(e0, pick(self.context), pick(self.context_img), rope, pick(self.key_mask),
                            pick(self.e0_rows))

    def with_tokens(self, rope, key_mask, e0_rows=None):
        """The same context for another set of tokens (a sequence shard); with a per-token t, the
        shard's e0_rows too (cut like rope)."""
        if self.e0_rows is not None and e0_rows is None:
            raise ValueError("This context has a per-token timestep (e0_rows [B, L]); a shard needs its slice of "
                             "e0_rows, cut like rope.")
        return replace(self, rope=rope, key_mask=key_mask, e0_rows=e0_rows)


class WanRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size=(-1, -1), qk_norm=True, eps=1e-6):
        super().__init__()
        assert dim % num_heads == 0
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size = window_size
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_q_eps = eps
        self.attn_op = make_attention_op("sdpa")

    def forward(self, x, ctx: BlockContext):
        """x: [B, L, dim] -> [B, L, dim]."""
        norm_weight = lambda norm: norm.weight if isinstance(norm, WanRMSNorm) else None
        q = fused_norm_and_rope(self.q(x), norm_weight(self.norm_q), self.norm_q_eps, self.num_heads, ctx.rope)
        k = fused_norm_and_rope(self.k(x), norm_weight(self.norm_k), self.norm_q_eps, self.num_heads, ctx.rope)
        v = self.v(x).unflatten(-1, (self.num_heads, self.head_dim))
        return self.o(self.attn_op(q, k, v, key_mask=ctx.key_mask).flatten(2))


class WanCrossAttention(nn.Module):
    """Attention from video tokens to text tokens, plus CLIP image tokens for i2v (`has_image`)."""

    def __init__(self, dim, num_heads, qk_norm=True, eps=1e-6, has_image=False):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.has_image = has_image
        if has_image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.attn_op = make_attention_op("sdpa")

    def forward(self, x, ctx: BlockContext):
        """x: [B, L, dim] -> [B, L, dim]."""
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim))
        q = heads(self.norm_q(self.q(x)))
        out = self.attn_op(q, heads(self.norm_k(self.k(ctx.context))), heads(self.v(ctx.context)))
        if self.has_image:
            img = ctx.context_img
            out = out + self.attn_op(q, heads(self.norm_k_img(self.k_img(img))), heads(self.v_img(img)))
        return self.o(out.flatten(2))


class WanAttentionBlock(nn.Module):
    def __init__(self, cross_attn_type, dim, ffn_dim, num_heads, window_size=(-1, -1), qk_norm=True,
                 cross_attn_norm=False, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, qk_norm, eps, has_image=cross_attn_type == "i2v_cross_attn")
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, ctx: BlockContext):
        """x: [B, L, dim] -> [B, L, dim]; six-way modulation from ctx.e0 [B, 6, dim], or per token
        from the table ctx.e0 [R, 6, dim] through ctx.e0_rows [B, L] (the same sum as Wan 2.2's
        modulation [1, 1, 6, dim] + e0 [B, L, 6, dim], computed once per distinct timestep)."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = \
            (m.to(x.dtype) for m in (self.modulation.float() + ctx.e0).unbind(1))
        rows = () if ctx.e0_rows is None else (ctx.e0_rows,)  # t [B]: the very same calls as Wan 2.1
        x = fused_gated_residual(x, self.self_attn(fused_modulate(x, self.norm1, shift_sa, scale_sa, *rows), ctx),
                                 gate_sa, *rows)
        x = x + self.cross_attn(self.norm3(x), ctx)
        x = fused_gated_residual(x, self.ffn(fused_modulate(x, self.norm2, shift_ff, scale_ff, *rows)), gate_ff, *rows)
        return x


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e, rows=None):
        """x: [B, L, dim], e: [B, dim] float32 (or the table [R, dim] with rows [B, L], per-token t)
        -> [B, L, prod(patch_size) * out_dim]. Wan 2.2 modulates the head with e, not e0."""
        shift, scale = (m.to(x.dtype) for m in (self.modulation.float() + e[:, None]).unbind(1))
        return self.head(modulate(x, self.norm, shift, scale, rows))


def run_blocks_sequentially(blocks, tokens, ctx):
    """The default block runner: every block on the tokens' device, one after another."""
    for block in blocks:
        tokens = block(tokens, ctx)
    return tokens


class WanModel(nn.Module):
    """Wan 2.1 and 2.2 diffusion transformer.

    Wan 2.1 1.3B: dim 1536, ffn_dim 8960, num_heads 12, num_layers 30.
    Wan 2.1 14B and each Wan 2.2 A14B expert: dim 5120, ffn_dim 13824, num_heads 40, num_layers 40.
    Wan 2.2 TI2V-5B ('ti2v'): dim 3072, ffn_dim 14336, num_heads 24, num_layers 30, in/out_dim 48.
    in_dim is 16 for t2v and 36 for i2v / flf2v (16 noise + 4 mask + 16 image-latent channels).
    image_embedding: the CLIP image branch (img_emb, k_img / v_img): Wan 2.1 i2v and flf2v have it
    (the default for them); Wan 2.2 I2V-A14B has none (i2v with image_embedding=False).

    For the documented multi-GPU arguments (parallelism_type, gpu_ids, enable_block_distribution)
    use the subclass wanvideo.parallel.MultiGPUWanModel.
    """

    prefers_batched_cfg = False  # the batch seam: strategies that split or pipeline the batch set it

    def __init__(self, model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048,
                 ffn_dim=8192, freq_dim=256, text_dim=4096, out_dim=16, num_heads=16, num_layers=32,
                 window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6, image_embedding=None):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not one of {', '.join(map(repr, MODEL_TYPES))}.")
        image_embedding = model_type in ("i2v", "flf2v") if image_embedding is None else bool(image_embedding)
        if image_embedding != (model_type in ("i2v", "flf2v")) and model_type != "i2v":
            raise ValueError(f"image_embedding={image_embedding} does not fit model_type {model_type!r}: only i2v "
                             "exists both with (Wan 2.1) and without (Wan 2.2 I2V-A14B) a CLIP image embedding.")
        self.image_embedding = image_embedding
        self.model_type, self.patch_size, self.text_len = model_type, tuple(patch_size), text_len
        self.in_dim, self.dim, self.ffn_dim, self.freq_dim = in_dim, dim, ffn_dim, freq_dim
        self.text_dim, self.out_dim, self.num_heads, self.num_layers = text_dim, out_dim, num_heads, num_layers
        self.window_size, self.qk_norm, self.cross_attn_norm, self.eps = window_size, qk_norm, cross_attn_norm, eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        cross_attn_type = "i2v_cross_attn" if image_embedding else "t2v_cross_attn"
        self.blocks = nn.ModuleList([
            WanAttentionBlock(cross_attn_type, dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps)
            for _ in range(num_layers)])
        self.head = Head(dim, out_dim, patch_size, eps)
        if image_embedding:
            self.img_emb = MLPProj(CLIP_DIM, dim, flf_pos_emb=model_type == "flf2v")
        self.block_runner = run_blocks_sequentially

    @property
    def head_dim(self):
        return self.dim // self.num_heads

    @property
    def compute_dtype(self):
        return self.head.head.weight.dtype

    def set_attention_backend(self, backend):
        """Route every attention of the model through `backend` ('sdpa', 'flash_attn', 'sageattention').
        Call it before a strategy replaces the self-attention op (sequence parallelism)."""
        op = make_attention_op(backend)
        if any(not isinstance(b.self_attn.attn_op, functools.partial) for b in self.blocks):
            raise RuntimeError("A parallel strategy has replaced the self-attention of this model; choose the "
                               "attention backend before applying it.")
        for block in self.blocks:
            block.self_attn.attn_op = op
            block.cross_attn.attn_op = op

    # --- the three stages of a forward ---------------------------------------------------------

    def embed(self, x, t, context, clip_fea=None, y=None):
        """Latents and conditioning -> (tokens [B, L, dim], BlockContext, e, grid sizes).

        x: list of [C, F, H, W]; t: [B] (or one value), or per token [B, >= L] (Wan 2.2; tokens in
        (F, H, W) order of the patch grid); context: list of [Lt, text_dim]; clip_fea: [B, Li, 1280]
        (Wan 2.1 i2v / flf2v; ignored by models without a CLIP embedding, as ComfyUI does);
        y: list of [C', F, H, W] concatenated to x on channels (i2v mask and image latents).
        e: [B, dim] float32, or for a per-token t the table [R, dim] that ctx.e0_rows indexes.
        """
        needs_y = self.model_type in ("i2v", "flf2v")
        if (self.image_embedding and clip_fea is None) or (needs_y and y is None):
            needed = "clip_fea (CLIP image tokens) and y (mask and image latents)" if self.image_embedding else \
                "y (mask and image latents; this i2v model has no CLIP image embedding)"
            raise ValueError(f"A {self.model_type} model needs {needed}; got " +
                             ("no clip_fea" if self.image_embedding and clip_fea is None else "no y") + ".")
        dtype, device = self.compute_dtype, self.patch_embedding.weight.device
        if y is not None:
            x = [torch.cat([u, v]) for u, v in zip(x, y)]
        if x[0].shape[0] != self.in_dim:
            raise ValueError(f"The model takes {self.in_dim} input channels; got {x[0].shape[0]}. "
                             + ("Image-to-video models need the mask and image latents in y." if self.in_dim > x[0].shape[0] else ""))
        shapes = [tuple(u.shape) for u in x]
        if len(set(shapes)) == 1:
            patches = self.patch_embedding(torch.stack(x).to(device, dtype))
            grid_sizes = [tuple(patches.shape[2:])] * len(x)
            tokens = patches.flatten(2).transpose(1, 2)
            key_mask = None
            rope = rope_frequencies(self.head_dim, grid_sizes[0], device)[None]
        else:  # ragged batch: pad to the longest sample and mask the padding out of self-attention
            patches = [self.patch_embedding(u[None].to(device, dtype)) for u in x]
            grid_sizes = [tuple(p.shape[2:]) for p in patches]
            seq_lens = [math.prod(g) for g in grid_sizes]
            longest = max(seq_lens)
            tokens = torch.cat([F.pad(p.flatten(2).transpose(1, 2), (0, 0, 0, longest - n))
                                for p, n in zip(patches, seq_lens)])
            key_mask = torch.arange(longest, device=device)[None] < torch.tensor(seq_lens, device=device)[:, None]
            rope = torch.stack([F.pad(rope_frequencies(self.head_dim, g, device), (0, 0, 0, 0, 0, 0, 0, longest - n))
                                for g, n in zip(grid_sizes, seq_lens)])

        e, e0, e0_rows = self.time_embeddings(t, len(x), tokens.shape[1])

        # zero-padded to text_len (512) as Wan does; prompts longer than that keep every token
        text_tokens = max(self.text_len, max(u.shape[0] for u in context))
        text = torch.stack([F.pad(u, (0, 0, 0, text_tokens - u.shape[0])) for u in context])
        text = self.text_embedding(text.to(device, dtype))
        context_img = self.img_emb(clip_fea.to(device, dtype)) if clip_fea is not None and self.image_embedding else None
        return tokens, BlockContext(e0, text, context_img, rope, key_mask, e0_rows), e, grid_sizes

    def time_embeddings(self, t, batch, length):
        """t [B] (or one value) -> (e [B, dim], e0 [B, 6, dim], None), float32.

        A per-token t [B or 1, >= length] (Wan 2.2) that varies along the tokens -> (e [R, dim],
        e0 [R, 6, dim], rows [B, length] int64): its R distinct timesteps embedded once each, and
        each token's row. A 720p TI2V-5B video has 27280 tokens but two timesteps (0 on the clean
        first frame): Wan 2.2's e0 [B, L, 6, dim] would take 2 GB per sample in float32. A t
        constant along the tokens takes the [B] path, bit for bit.
        """
        dtype, device = self.compute_dtype, self.patch_embedding.weight.device
        t, rows = t.to(device), None
        if t.dim() == 2:
            if t.shape[1] < length:
                raise ValueError(f"The per-token t has {t.shape[1]} timesteps per sample; the latents make {length} "
                                 "tokens. Give t of shape [B, seq_len] with seq_len >= the token count, or [B].")
            t = t[:, :length].expand(batch, -1)
            if bool((t == t[:, :1]).all()):
                t = t[:, 0]
            else:
                t, rows = torch.unique(t, return_inverse=True)
        elif t.numel() == 1:
            t = t.reshape(-1).expand(batch)
        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t).to(dtype)).float()
        e0 = self.time_projection(e.to(dtype)).float().unflatten(1, (6, self.dim))
        return e, e0, rows

    def unembed(self, tokens, e, grid_sizes, e_rows=None):
        """Tokens [B, L, dim] -> list of [out_dim, F, H, W] float32 latents; e and e_rows as embed
        gives them (e_rows: the BlockContext's e0_rows, for a per-token t)."""
        e, e_rows = e.to(tokens.device), None if e_rows is None else e_rows.to(tokens.device)
        run_head = getattr(self.block_runner, "run_head", None)  # the seam of runners that shard the tokens
        out = self.head(tokens, e, e_rows) if run_head is None else run_head(self.head, tokens, e, e_rows)
        pf, ph, pw = self.patch_size
        videos = []
        for u, (f, h, w) in zip(out, grid_sizes):
            u = u[: f * h * w].view(f, h, w, pf, ph, pw, self.out_dim)
            videos.append(torch.einsum("fhwpqrc->cfphqwr", u).reshape(self.out_dim, f * pf, h * ph, w * pw).float())
        return videos

    def forward(self, x, t, context, seq_len=None, clip_fea=None, y=None):
        """x: list of [C, F, H, W]; t: [B] timesteps (0..1000), or per token [B, seq_len] as in
        Wan 2.2 (token i of sample b at t[b, i]; columns past the token count are ignored);
        context: list of [Lt, text_dim]; seq_len: the official maximum token count (checked, no
        padding is needed); clip_fea: [B, 257 or 514, 1280] CLIP tokens (Wan 2.1 i2v / flf2v);
        y: list of [C', F, H, W]. Returns a list of [out_dim, F, H, W] float32 tensors.
        """
        if isinstance(x, torch.Tensor):
            x = list(x)
        tokens, ctx, e, grid_sizes = self.embed(x, t, context, clip_fea, y)
        if seq_len is not None and tokens.shape[1] > seq_len:
            raise ValueError(f"The latents make {tokens.shape[1]} tokens, more than seq_len={seq_len}.")
        tokens = self.block_runner(self.blocks, tokens, ctx)
        return self.unembed(tokens, e, grid_sizes, ctx.e0_rows)
