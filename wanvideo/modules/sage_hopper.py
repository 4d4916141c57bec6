"""sage_triton's attention kernel for Hopper (sm_90), warp-specialized, in Triton's Gluon dialect.

The same math as sage_triton's kernel (INT8 Q.K, FP8 P.V, FP32 accumulation; see that module), on
the operands its `quantize` makes, scheduled as FlashAttention-3 does, which Triton's `tl.dot`
cannot express. One CTA takes BLOCK_M = 128 queries of one (batch, head), over all keys (or a range
of them: the tail parts below), with three warp groups:

  producer (1 warp, 24 registers): K and V tiles of BLOCK_N keys by TMA into NUM_STAGES buffers;
  two consumers (4 warps each, 240 registers): 64 query rows each. At key tile j a consumer issues
      tile j's Q.K and tile j-1's P.V and row sums on the tensor cores (async wgmma), waits for the
      Q.K only and runs tile j's softmax while the other two still run; a buffer goes back to the
      producer once both consumers' P.V on it is done.

Three details keep the consumers' instruction count near the softmax's own:
  * P crosses an iteration in fp32 and is cast to FP8 right before its product, so the compiler
    packs four FP8 values per register directly (carried as FP8, it unpacks and repacks every byte);
  * a thread's accumulator registers hold S's columns in another order than the FP8 operand of the
    P.V product wants (s = 16h + 8j + 2c + e against k = 16h + 4c + 2j + e within each 16 keys), so
    instead of moving P between threads, `quantize(permute_keys=True)` stores V's keys in the
    operand's order (sage_triton.hopper_key_order) and P's columns are relabelled to match: the
    product is unchanged;
  * the row sums of P come from the tensor cores too: P times a block-diagonal operand of ones
    (row_sum_operand) gives SUM_PARTS partial sums a row, each of BLOCK_N / SUM_PARTS keys, instead of
    an addition per element (an eighth of a consumer's instructions; measured about 8% faster).
    The partial sums start from zero at every tile and are few keys each, because the tensor cores
    add FP8 products with about 14 bits: one running sum of all keys would lose the small terms.

The work items (query blocks x batch x heads) are equal and a multiprocessor runs one at a time,
so a last wave of a few items would leave most multiprocessors idle for a whole item's time (12
heads at 32,760 tokens: 3,072 items are 23.27 waves of 132). tail_split splits such a tail into key
ranges, CTAs of their own; each part leaves its unnormalized output, row maximum and row sum, and
_combine_tail_kernel merges them as ring attention merges chunks (measured 2.2-2.4% faster there).

No key mask (sage_triton keeps masked calls on its Triton kernel); the padding keys of the last
tile are masked by their index. Needs a GPU with compute capability 9.0 and a Triton with Gluon.
"""
import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .sage_triton import INT_SCORE_SENTINEL, K_QUANT_BLOCK, LN2, LOG2_FP8_MAX, QUANT_BLOCK

WG_ROWS = gl.constexpr(64)  # query rows of one consumer warp group (one wgmma M)
BLOCK_M = 2 * WG_ROWS.value  # two consumers
# P [64, N] -> the operand's column order: viewed as [64, N / 16, j, c, e], (j, c) swapped.
RELABEL_SPLIT = gl.constexpr((2, 4, 2))
RELABEL_ORDER = gl.constexpr((0, 1, 3, 2, 4))
BLOCK_N = 128
NUM_STAGES = 3              # measured on an H200: 2 starves the consumers, 4-5 gain nothing
SUM_PARTS = gl.constexpr(16)  # partial row sums of P a tile (the row-sum product's N; 8 measured slower)
CONSUMER_REGS = 240         # per thread; the producer gets 24: 2 x 128 x 240 + 128 x 24 <= 64k (232 spills)
MAX_TAIL_SPLITS = 4         # tail_split: key ranges a tail item may be split into
MIN_PART_TILES = 8          # and the fewest key tiles a range keeps
MAXNREG = 168               # the kernel's launch bound: 12 warps x 32 x 168 registers fit one SM


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, ready, empty, k_row0, v_row0, t0, t1,
              BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Load key tile j's K [BLOCK_N, D] and V [D, BLOCK_N] (j = t0 ... t1 - 1) into buffer (j - t0) %
    NUM_STAGES once it is free."""
    for j in range(t0, t1):
        i = j - t0
        stage = i % NUM_STAGES
        # mbarriers start as if phase 1 had completed: the first NUM_STAGES waits pass at once.
        mbarrier.wait(empty.index(stage), ((i // NUM_STAGES) & 1) ^ 1)
        bar = ready.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row0 + j * BLOCK_N, 0], bar, k_smem.index(stage))
        tma.async_copy_global_to_shared(v_desc, [v_row0, j * BLOCK_N], bar, v_smem.index(stage))


@gluon.jit
def _softmax(s, sc, m_i, col0, Lk, P_LOG2_SCALE: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
             MASK: gl.constexpr):
    """INT32 scores s [64, N] of keys col0... (row scale sc [64]) -> (p [64, N] fp32 in [0, 448],
    alpha [64], m [64]) as sage_triton's kernel (the row sums are the tensor cores'). MASK: keys at or
    past Lk get p = 0 (a tile always holds a real key; masked: a CTA's first tile and the last one)."""
    if MASK:
        valid = gl.expand_dims(col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)) < Lk, 0)
        s = gl.where(valid, s, INT_SCORE_SENTINEL)
    m_new = gl.maximum(m_i, gl.max(s, axis=1).to(gl.float32) * sc)   # the row maximum on INT32 products
    m_sub = m_new - P_LOG2_SCALE
    p = gl.exp2(s.to(gl.float32) * gl.expand_dims(sc, 1) - gl.expand_dims(m_sub, 1))
    if MASK:  # not by the sentinel's product alone: times a tiny scale (an all-zero block) it is near 0
        p = gl.where(s == INT_SCORE_SENTINEL, 0.0, p)
    return p, gl.exp2(m_i - m_new), m_new


@gluon.jit
def _to_operand(p, p_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """fp32 P [64, N] (accumulator layout) -> FP8 A operand of the P.V product, columns relabelled to
    sage_triton.hopper_key_order (register renaming: no data moves between threads)."""
    p8 = p.to(gl.float8e4nv).reshape((64, BLOCK_N // 16) + RELABEL_SPLIT).permute(RELABEL_ORDER.value)
    return gl.convert_layout(p8.reshape([64, BLOCK_N]), p_layout)


@gluon.jit
def _consumer(q_desc, ones_desc, k_smem, v_smem, q_smem, ones_smem, q_bar, ready, empty,
              QS, KS, VS, SHIFT, O, LSE, PART_O, PART_ML, bh, b, h, block_m, part, Lq, Lk, N_QS, N_KS, LQ_PAD,
              t0, t1, n_tiles, stride_ob, stride_ol, stride_oh,
              WG: gl.constexpr, HEAD_DIM: gl.constexpr, QUANT_BLOCK: gl.constexpr, K_QUANT_BLOCK: gl.constexpr,
              RETURN_LSE: gl.constexpr, P_LOG2_SCALE: gl.constexpr, BLOCK_N: gl.constexpr,
              NUM_STAGES: gl.constexpr):
    """Query rows block_m * 128 + WG * 64 ... + 63 of (batch, head) bh: attention over key tiles t0 ... t1 - 1
    (of n_tiles). part < 0: all of them, the output into O (and LSE); else a tail part: its unnormalized
    output into PART_O and (maximum, row sum) into PART_ML, at rows part * 128 + WG * 64 ..."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32])
    sum_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, SUM_PARTS, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    p_sum_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=sum_layout, k_width=4)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    row0 = block_m * (2 * WG_ROWS) + WG * WG_ROWS
    q_tile = q_smem.index(WG)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes + ones_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [bh * LQ_PAD + row0, 0], q_bar, q_tile)
    tma.async_copy_global_to_shared(ones_desc, [0, 0], q_bar, ones_smem)
    offs_m = row0 + gl.arange(0, WG_ROWS, layout=row_layout)
    row_scale = gl.load(QS + bh * N_QS + offs_m // QUANT_BLOCK)
    ks_base = KS + bh * N_KS
    zero_s = gl.zeros([WG_ROWS, BLOCK_N], gl.int32, s_layout)
    zero_sums = gl.zeros([WG_ROWS, SUM_PARTS], gl.float32, sum_layout)
    acc = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([WG_ROWS], gl.float32, row_layout)
    mbarrier.wait(q_bar, 0)

    # Tile t0: its scores, then its softmax (masked: it may be the last).
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False)
    sc = row_scale * gl.load(ks_base + (t0 * BLOCK_N) // K_QUANT_BLOCK)
    p, alpha, m_i = _softmax(s, sc, m_i, t0 * BLOCK_N, Lk, P_LOG2_SCALE, BLOCK_N, s_layout, True)
    for j in range(t0 + 1, t1):
        i = j - t0
        stage = i % NUM_STAGES
        prev = (i - 1) % NUM_STAGES
        mbarrier.wait(ready.index(stage), (i // NUM_STAGES) & 1)
        s_tok = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p_op = _to_operand(p, p_layout, BLOCK_N)  # P's cast runs while the Q.K does
        acc_tok = warpgroup_mma(p_op, v_smem.index(prev).permute((1, 0)), acc, is_async=True)
        sums_tok = warpgroup_mma(gl.convert_layout(p_op, p_sum_layout), ones_smem.permute((1, 0)), zero_sums,
                                 use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok, ))   # tile j's scores; tile j-1's products run on
        sc = row_scale * gl.load(ks_base + (j * BLOCK_N) // K_QUANT_BLOCK)
        if j == n_tiles - 1:
            p, alpha, m_i = _softmax(s, sc, m_i, j * BLOCK_N, Lk, P_LOG2_SCALE, BLOCK_N, s_layout, True)
        else:
            p, alpha, m_i = _softmax(s, sc, m_i, j * BLOCK_N, Lk, P_LOG2_SCALE, BLOCK_N, s_layout, False)
        acc, sums = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, sums_tok))
        mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_row_layout), 1)
        l_i = (l_i + gl.convert_layout(gl.sum(sums, axis=1), row_layout)) * alpha
    last = (t1 - 1 - t0) % NUM_STAGES
    p_op = _to_operand(p, p_layout, BLOCK_N)
    acc = warpgroup_mma(p_op, v_smem.index(last).permute((1, 0)), acc)
    sums = warpgroup_mma(gl.convert_layout(p_op, p_sum_layout), ones_smem.permute((1, 0)), zero_sums, use_acc=False)
    l_i = l_i + gl.convert_layout(gl.sum(sums, axis=1), row_layout)
    mbarrier.arrive(empty.index(last), count=1)

    o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    if part >= 0:  # a tail part: _combine_tail_kernel finishes these rows
        part_row0 = part * (2 * WG_ROWS) + WG * WG_ROWS
        part_rows = part_row0 + gl.arange(0, WG_ROWS, layout=o_row_layout)
        gl.store(PART_O + gl.expand_dims(part_rows.to(gl.int64), 1) * HEAD_DIM + gl.expand_dims(o_cols, 0), acc)
        ml_rows = part_row0 + gl.arange(0, WG_ROWS, layout=row_layout)
        gl.store(PART_ML + 2 * ml_rows, m_i)
        gl.store(PART_ML + 2 * ml_rows + 1, l_i)
    else:
        o_rows = row0 + gl.arange(0, WG_ROWS, layout=o_row_layout)
        v_scale = gl.load(VS + bh * HEAD_DIM + o_cols)
        out = acc * gl.expand_dims(1.0 / gl.convert_layout(l_i, o_row_layout), 1) * gl.expand_dims(v_scale, 0)
        ptrs = (O + b * stride_ob + h * stride_oh + gl.expand_dims(o_rows.to(gl.int64), 1) * stride_ol
                + gl.expand_dims(o_cols, 0))
        gl.store(ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(o_rows < Lq, 1))
        if RETURN_LSE:
            rows = offs_m < Lq
            shift = gl.load(SHIFT + bh * Lq + offs_m, mask=rows, other=0.0)
            lse = (m_i + gl.log2(l_i) - P_LOG2_SCALE) * LN2 + shift
            gl.store(LSE + bh * Lq + offs_m, lse, mask=rows)


@gluon.jit(do_not_specialize=["Lq", "Lk", "N_QS", "N_KS", "NB", "WHOLE", "SPLITS"])  # no compile per length
def _sage_hopper_kernel(q_desc, ones_desc, k_desc, v_desc, QS, KS, VS, SHIFT, O, LSE, PART_O, PART_ML,
                        H, Lq, Lk, LQ_PAD, L_PAD, N_QS, N_KS, NB, WHOLE, SPLITS, stride_ob, stride_ol, stride_oh,
                        HEAD_DIM: gl.constexpr, QUANT_BLOCK: gl.constexpr, K_QUANT_BLOCK: gl.constexpr,
                        RETURN_LSE: gl.constexpr, P_LOG2_SCALE: gl.constexpr, BLOCK_N: gl.constexpr,
                        NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Q int8 [B*H*LQ_PAD, D], K int8 [B*H*L_PAD, D], V fp8 [B*H*D, L_PAD] (keys in hopper_key_order) and
    row_sum_operand [SUM_PARTS, BLOCK_N] by TMA descriptors; QS, KS, VS the scales, SHIFT [B, H, Lq]
    (RETURN_LSE) -> O [B, Lq, H, D] (strided), LSE [B, H, Lq] (RETURN_LSE).
    One CTA a work item (query block block_m of (batch, head) bh: item = bh * NB + block_m) for the first
    WHOLE items; the later items take SPLITS CTAs each, one per key range, whose parts go to PART_O
    [parts * 128, D] and PART_ML [parts * 128, 2] (tail_split says why)."""
    gl.static_assert(K_QUANT_BLOCK % BLOCK_N == 0, "a key tile must lie in one K scale block")
    n_tiles = gl.cdiv(Lk, BLOCK_N)
    pid = gl.program_id(0)
    if pid < WHOLE:
        item = pid
        part = -1
        t0 = 0
        t1 = n_tiles
    else:
        part = pid - WHOLE
        item = WHOLE + part // SPLITS
        split = part % SPLITS
        t0 = split * n_tiles // SPLITS
        t1 = (split + 1) * n_tiles // SPLITS
    block_m = item % NB
    bh = item // NB
    b = (bh // H).to(gl.int64)  # int64: b * stride_ob passes 2^31 from a few videos of 720p up
    h = bh % H
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ones_smem = gl.allocate_shared_memory(ones_desc.dtype, [2] + ones_desc.block_type.shape, ones_desc.layout)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a buffer
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (q_desc, ones_desc, k_smem, v_smem, q_smem, ones_smem.index(0), q_bars.index(0), ready, empty,
                     QS, KS, VS, SHIFT, O, LSE, PART_O, PART_ML, bh, b, h, block_m, part, Lq, Lk, N_QS, N_KS,
                     LQ_PAD, t0, t1, n_tiles, stride_ob, stride_ol, stride_oh,
                     0, HEAD_DIM, QUANT_BLOCK, K_QUANT_BLOCK, RETURN_LSE, P_LOG2_SCALE, BLOCK_N, NUM_STAGES)),
        (_consumer, (q_desc, ones_desc, k_smem, v_smem, q_smem, ones_smem.index(1), q_bars.index(1), ready, empty,
                     QS, KS, VS, SHIFT, O, LSE, PART_O, PART_ML, bh, b, h, block_m, part, Lq, Lk, N_QS, N_KS,
                     LQ_PAD, t0, t1, n_tiles, stride_ob, stride_ol, stride_oh,
                     1, HEAD_DIM, QUANT_BLOCK, K_QUANT_BLOCK, RETURN_LSE, P_LOG2_SCALE, BLOCK_N, NUM_STAGES)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, ready, empty, bh * L_PAD, bh * HEAD_DIM, t0, t1,
                     BLOCK_N, NUM_STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


@triton.jit(do_not_specialize=["WHOLE", "NB", "H", "Lq"])
def _combine_tail_kernel(PART_O, PART_ML, VS, SHIFT, O, LSE, WHOLE, SPLITS, NB, H, Lq,
                         stride_ob, stride_ol, stride_oh, RETURN_LSE: tl.constexpr, P_LOG2_SCALE: tl.constexpr,
                         BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Tail item WHOLE + program_id(0) from its SPLITS parts (unnormalized output [128, D], row maxima m and
    sums l, in the kernel's log2 units): weights 2^(m - max m), then as the kernel's own epilogue."""
    item = WHOLE + tl.program_id(0)
    bh = item // NB
    b, h = (bh // H).to(tl.int64), bh % H
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    first = tl.program_id(0) * SPLITS * BLOCK_M
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(SPLITS):
        top = tl.maximum(top, tl.load(PART_ML + 2 * (first + split * BLOCK_M + rows)))
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for split in range(SPLITS):
        part_rows = first + split * BLOCK_M + rows
        weight = tl.exp2(tl.load(PART_ML + 2 * part_rows) - top)
        total += weight * tl.load(PART_ML + 2 * part_rows + 1)
        acc += weight[:, None] * tl.load(PART_O + part_rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :])
    q_rows = (item % NB) * BLOCK_M + rows
    real = q_rows < Lq
    out = acc / total[:, None] * tl.load(VS + bh * HEAD_DIM + cols)[None, :]
    tl.store(O + b * stride_ob + h * stride_oh + q_rows.to(tl.int64)[:, None] * stride_ol + cols[None, :],
             out.to(O.dtype.element_ty), mask=real[:, None])
    if RETURN_LSE:
        shift = tl.load(SHIFT + bh * Lq + q_rows, mask=real, other=0.0)
        tl.store(LSE + bh * Lq + q_rows, (top + tl.log2(total) - P_LOG2_SCALE) * LN2 + shift, mask=real)


def tail_split(items, sms, tiles):
    """How the kernel shares its work items (query blocks x batch x heads, equal work each, one CTA
    a multiprocessor at a time) out among sms multiprocessors -> (whole, splits): the first `whole`
    items run whole; the last items % sms, which would run as a last wave with most multiprocessors
    idle (a whole item's time), are split into `splits` ranges of keys, so that more multiprocessors
    share them (a part's time): as many as fit one wave (sms // tail: none where the tail fills half
    a wave or more), at most MAX_TAIL_SPLITS, and MIN_PART_TILES key tiles a part at least (never an
    empty range, which the kernel would wait for forever). (items, 1): no split."""
    tail = items % sms
    splits = min(MAX_TAIL_SPLITS, sms // tail, tiles // MIN_PART_TILES) if tail else 1
    return (items - tail, splits) if splits >= 2 else (items, 1)


_row_sum_operands = {}


def row_sum_operand(device):
    """[SUM_PARTS, BLOCK_N] FP8: row n is one at the n-th BLOCK_N / SUM_PARTS keys and zero elsewhere, so
    P [64, BLOCK_N] times its transpose is P's row sums in SUM_PARTS parts. Made once per device."""
    if device not in _row_sum_operands:
        part = torch.arange(BLOCK_N, device=device) // (BLOCK_N // SUM_PARTS.value)
        ones = part[None, :] == torch.arange(SUM_PARTS.value, device=device)[:, None]
        _row_sum_operands[device] = ones.to(torch.float8_e4m3fn)
    return _row_sum_operands[device]


def descriptors(ops):
    """TMA descriptors of quantize's Q [.., D], row_sum_operand, K [.., D] and V [.., L_PAD] as 2-D views,
    one tile each."""
    dim = ops["q"].shape[-1]
    q = ops["q"].view(-1, dim)
    k = ops["k"].view(-1, dim)
    v = ops["v"].view(-1, ops["v"].shape[-1])

    def describe(t, block, dtype):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block,
                                gl.NVMMASharedLayout.get_default_for(block, dtype))
    return (describe(q, [WG_ROWS.value, dim], gl.int8),
            describe(row_sum_operand(q.device), [SUM_PARTS.value, BLOCK_N], gl.float8e4nv),
            describe(k, [BLOCK_N, dim], gl.int8), describe(v, [dim, BLOCK_N], gl.float8e4nv))


def attend(ops, out, lse, lk, sms=None):
    """Run the kernel on sage_triton.quantize(..., permute_keys=True)'s operands (no key mask, FP8 P/V)
    for lk keys into out [B, Lq, H, D], and lse [B, H, Lq] where quantize made the log-sum-exp's shift.
    sms: the multiprocessors to plan the tail for (tail_split; default: the GPU's)."""
    batch, heads, lq_pad, dim = ops["q"].shape
    lq = out.shape[1]
    return_lse = ops["shift"] is not None
    shift = ops["shift"] if return_lse else ops["v_scale"]
    blocks = triton.cdiv(lq, BLOCK_M)
    items = blocks * batch * heads
    sms = sms or torch.cuda.get_device_properties(out.device).multi_processor_count
    whole, splits = tail_split(items, sms, triton.cdiv(lk, BLOCK_N))
    parts = (items - whole) * splits
    part_o = part_ml = ops["v_scale"]  # never read without parts
    if parts:
        part_o = torch.empty(parts * BLOCK_M, dim, dtype=torch.float32, device=out.device)
        part_ml = torch.empty(parts * BLOCK_M, 2, dtype=torch.float32, device=out.device)
    _sage_hopper_kernel[(whole + parts, )](
        *descriptors(ops), ops["q_scale"], ops["k_scale"], ops["v_scale"], shift, out, lse, part_o, part_ml,
        heads, lq, lk, lq_pad, ops["k"].shape[2], ops["q_scale"].shape[2], ops["k_scale"].shape[2],
        blocks, whole, splits, out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=dim, QUANT_BLOCK=QUANT_BLOCK, K_QUANT_BLOCK=K_QUANT_BLOCK, RETURN_LSE=return_lse,
        P_LOG2_SCALE=LOG2_FP8_MAX, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES, CONSUMER_REGS=CONSUMER_REGS,
        num_warps=4, maxnreg=MAXNREG)
    if parts:
        combine_tail(part_o, part_ml, ops["v_scale"], shift, out, lse, whole, items - whole, splits, blocks, heads,
                     return_lse)


def combine_tail(part_o, part_ml, v_scale, shift, out, lse, whole, tail, splits, blocks, heads, return_lse):
    """The outputs (and log-sum-exp) of the tail items whole ... whole + tail - 1 from their parts (see
    _sage_hopper_kernel)."""
    _combine_tail_kernel[(tail, )](
        part_o, part_ml, v_scale, shift, out, lse, whole, splits, blocks, heads, out.shape[1],
        out.stride(0), out.stride(1), out.stride(2), RETURN_LSE=return_lse, P_LOG2_SCALE=LOG2_FP8_MAX,
        BLOCK_M=BLOCK_M, HEAD_DIM=part_o.shape[1], num_warps=8)
