"""8-bit attention in Triton (attention_mode 'sage_triton'): INT8 Q/K, FP8 P/V, FP32 accumulation.

The math, for one (batch, head):
  1. K is smoothed: k' = k - mean_over_tokens(k). Every score of a query moves by the same q . mean,
     so the softmax (and the output) does not change, but k' is centred, which makes its INT8
     quantization finer (Wan's keys carry large per-channel offsets).
  2. Q (pre-multiplied by softmax_scale * log2(e), so scores come out in base 2) and k' are
     quantized to INT8 per block of QUANT_BLOCK (Q) and K_QUANT_BLOCK (K) tokens: x ~ x_int8 * scale,
     scale = amax|x| / 127.
  3. Scores s = (q_int8 . k_int8) * q_scale * k_scale, from an INT8 tensor-core dot (INT32 exact).
     A key tile lies in one K block, so within a tile a query row's scale is one number.
  4. Online softmax over key tiles: running max m and running sum l in FP32. The tile's
     probabilities p = 2^(s - m) are scaled to [0, 448] (e4m3's largest value, so they use the whole
     FP8 range) and cast to FP8 e4m3; V is cast to FP8 e4m3 once, per channel scaled to [-448, 448];
     P @ V runs on FP8 tensor cores into an FP32 accumulator. l sums the FP32 p (same 448 scale),
     so the 448 cancels in acc / l.
  5. out = acc / l * v_scale; log-sum-exp (natural log, for merging partial attentions) =
     (m + log2 l - log2 448) * ln 2 + q . mean * softmax_scale (the smoothing shift added back).
Masked keys (key_mask False: padding of ragged batches) get score -inf, and take no part in the
quantization either (not in the mean, the scales or V's range), so their content cannot matter.

GPUs without FP8 tensor cores (compute capability below 8.9) keep P and V in fp16 (Q/K stay INT8).
On Hopper (compute capability 9.0) self-attention without a key mask runs sage_hopper's
warp-specialized kernel on the same operands (see hopper_kernel_for; 1.36-1.67x of cuDNN's SDPA on
an H200 where this module's kernel gives 1.19-1.32x, benchmarks/RESULTS.md); the rest runs this
module's kernel.

Layout: q [B, Lq, H, D], k and v [B, Lk, H, D] (the attention call's), D = 128. The quantized copies
are [B, H, L_pad, D] for Q and K and [B, H, D, L_pad] for V (tokens contiguous: the FP8 dot wants
its second operand K-major on Hopper), L_pad a multiple of PAD_TO.

Under Triton's CPU interpreter (TRITON_INTERPRET=1, tests) the kernels run in numpy. Its fp32 -> fp8
cast drops the carry when rounding crosses a power of two (0.499 -> 0.25), so there, and only there,
values are first rounded to e4m3's 3-bit mantissa in fp32 (exactly what the GPU's cast does) so the
cast itself is exact.
"""
import logging
import math
import os

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

HEAD_DIM = 128
QUANT_BLOCK = 64      # tokens per INT8 scale of Q
K_QUANT_BLOCK = 128   # tokens per INT8 scale of K: a key tile (at most 128 keys) has one scale
PAD_TO = 128          # quantized copies are padded to this many tokens (the largest tile)
assert PAD_TO % QUANT_BLOCK == 0 and PAD_TO % K_QUANT_BLOCK == 0  # no scale block runs past the padding
FP8_MAX = 448.0       # largest finite float8_e4m3fn
LOG2_FP8_MAX = math.log2(FP8_MAX)
LOG2E = 1.4426950408889634
LN2 = tl.constexpr(math.log(2.0))  # a tl.constexpr: the only kind of global a kernel may read

# The kernels are built as interpreted or compiled when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_warned = set()


def _fix_interpreter_loops():
    """Triton 3.6's interpreter turns a tensor into a loop bound with int() of a 1-element array,
    which numpy 2.4 refuses ('only 0-dimensional arrays can be converted'), so no kernel with a
    runtime loop bound runs (triton-lang/triton issue 9171, fixed after 3.6). Add the same fix on top
    of its own patching: take the one element explicitly. Interpreter only; harmless where not needed."""
    from triton.runtime import interpreter
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_wanvideo_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._wanvideo_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRETED:
    _fix_interpreter_loops()


def _warn_once(key, message, *args):
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


# --- helpers inside kernels ------------------------------------------------------------------------

@triton.jit
def _round_to_e4m3_mantissa(x):
    """Round fp32 to 3 mantissa bits, nearest-even (interpreter only, see the module docstring).
    Adding 2^19 - 1 plus the lowest kept bit, then clearing the 20 dropped bits, carries into the
    exponent when the mantissa overflows, as a correct rounding must."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    return bits.to(tl.float32, bitcast=True)


# --- quantization kernels ------------------------------------------------------------------------

@triton.jit
def _load_token_block(X, BIAS, block, bh, L, H, stride_xb, stride_xl, stride_xh, L_PAD,
                      HEAD_DIM: tl.constexpr, QUANT_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    """Tokens block * QUANT_BLOCK ... of (batch, head) bh of X [B, L, H, D] -> (x [QUANT_BLOCK, D] float32,
    zero on padding and, with HAS_MASK, on masked keys (BIAS [B, L_PAD] not 0); real [QUANT_BLOCK]:
    which tokens are neither; their offsets along L; the offsets along D)."""
    b, h = bh // H, bh % H
    offs_l = block * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    real = offs_l < L
    if HAS_MASK:
        real = real & (tl.load(BIAS + b * L_PAD + offs_l) == 0.0)
    x = tl.load(X + b * stride_xb + h * stride_xh + offs_l[:, None] * stride_xl + offs_d[None, :],
                mask=real[:, None], other=0.0).to(tl.float32)
    return x, real, offs_l, offs_d


@triton.jit
def _quantize_qk_kernel(X, MEAN, BIAS, OUT, SCALE, SHIFT,
                        L, H, stride_xb, stride_xl, stride_xh,
                        L_PAD, N_SCALES, factor, shift_factor,
                        HEAD_DIM: tl.constexpr, QUANT_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr,
                        SUBTRACT_MEAN: tl.constexpr, COMPUTE_SHIFT: tl.constexpr):
    """One block of QUANT_BLOCK tokens of one (batch, head) of X [B, L, H, D] -> INT8 OUT [B, H, L_PAD, D]
    and its scale SCALE [B, H, N_SCALES]. X is multiplied by `factor` first; with SUBTRACT_MEAN,
    MEAN [B, H, D] is subtracted before that. With COMPUTE_SHIFT, SHIFT [B, H, L] gets
    (x . MEAN) * shift_factor per token (the log-sum-exp correction of the smoothing). With HAS_MASK,
    tokens whose BIAS [B, L_PAD] is not 0 (masked keys) are quantized as 0, so they do not widen the
    block's scale (their content is arbitrary: padding)."""
    block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets pass 2^31 at large B*H*L
    x, real, offs_l, offs_d = _load_token_block(X, BIAS, block, bh, L, H, stride_xb, stride_xl, stride_xh, L_PAD,
                                                HEAD_DIM, QUANT_BLOCK, HAS_MASK)
    if COMPUTE_SHIFT:
        mean = tl.load(MEAN + bh * HEAD_DIM + offs_d)
        tl.store(SHIFT + bh * L + offs_l, tl.sum(x * mean[None, :], axis=1) * shift_factor, mask=real)
    if SUBTRACT_MEAN:
        mean = tl.load(MEAN + bh * HEAD_DIM + offs_d)
        x = tl.where(real[:, None], x - mean[None, :], 0.0)  # padding rows stay 0
    x = x * factor
    scale = tl.maximum(tl.max(tl.abs(x)), 1e-30) / 127.0
    y = x / scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5)  # round half away from zero (the cast truncates)
    tl.store(OUT + bh * L_PAD * HEAD_DIM + offs_l[:, None] * HEAD_DIM + offs_d[None, :], y.to(tl.int8))
    tl.store(SCALE + bh * N_SCALES + block, scale)


@triton.jit
def _quantize_v_kernel(X, SCALE, BIAS, OUT, L, H, stride_xb, stride_xl, stride_xh, L_PAD,
                       HEAD_DIM: tl.constexpr, QUANT_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr,
                       SOFT_ROUND: tl.constexpr, PERMUTE_KEYS: tl.constexpr):
    """One block of tokens of V [B, L, H, D] -> OUT [B, H, D, L_PAD] (fp8 e4m3 or fp16, tokens
    contiguous), divided by its per-channel SCALE [B, H, D]; padding (and masked, HAS_MASK) tokens are 0.
    PERMUTE_KEYS: token s goes to hopper_key_order's position (the Hopper kernel's P.V operand order)."""
    block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets pass 2^31 at large B*H*L
    x, real, offs_l, offs_d = _load_token_block(X, BIAS, block, bh, L, H, stride_xb, stride_xl, stride_xh, L_PAD,
                                                HEAD_DIM, QUANT_BLOCK, HAS_MASK)
    x = x / tl.load(SCALE + bh * HEAD_DIM + offs_d)[None, :]
    if SOFT_ROUND:
        x = _round_to_e4m3_mantissa(x)
    if PERMUTE_KEYS:
        offs_l = offs_l - (offs_l & 15) + 4 * ((offs_l >> 1) & 3) + 2 * ((offs_l >> 3) & 1) + (offs_l & 1)
    tl.store(OUT + bh * HEAD_DIM * L_PAD + offs_d[None, :] * L_PAD + offs_l[:, None], x.to(OUT.dtype.element_ty))


# --- the attention kernel ------------------------------------------------------------------------

# The INT32 score of a masked key: below any real one (|q . k| <= 127^2 * 128 < 2^21). A tl.constexpr,
# the only kind of global a kernel may read.
INT_SCORE_SENTINEL = tl.constexpr(-(1 << 30))


@triton.jit
def _attend_tile(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, bias_base, start_n, Lk, L_PAD,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, K_QUANT_BLOCK: tl.constexpr,
                 BOUNDARY: tl.constexpr, HAS_MASK: tl.constexpr, PV_FP8: tl.constexpr,
                 P_LOG2_SCALE: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """Fold the key tile [start_n, start_n + BLOCK_N) into the running (acc [M, D], l [M], m [M])."""
    tl.static_assert(K_QUANT_BLOCK % BLOCK_N == 0, "a key tile must lie in one K scale block")
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])                 # int8 [N, D]
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32)                                     # [M, N], exact
    if HAS_MASK:  # bias: 0 for real keys, -inf for masked and padding keys
        valid = tl.load(bias_base + offs_n) == 0.0
    else:
        valid = offs_n < Lk
    if HAS_MASK or BOUNDARY:
        s = tl.where(valid[None, :], s, INT_SCORE_SENTINEL)
    # The tile lies in one K scale block, so a row's scale is one number: the row's largest score is
    # its largest INT32 product, scaled (BLOCK_M multiplies, not M x N).
    sc = q_scale * tl.load(ks_base + start_n // K_QUANT_BLOCK)                          # [M]
    row_max = tl.max(s, axis=1)
    m_new = tl.maximum(m_i, tl.where(row_max == INT_SCORE_SENTINEL, float("-inf"), row_max.to(tl.float32) * sc))
    # Rows whose keys so far are all masked keep m = -inf; subtract 0 there instead (no inf - inf).
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new) - P_LOG2_SCALE
    x = s.to(tl.float32) * sc[:, None] - m_sub[:, None]
    if HAS_MASK or BOUNDARY:
        x = tl.where(valid[None, :], x, float("-inf"))
    p = tl.exp2(x)                                                                      # [M, N] in [0, 448]
    alpha = tl.exp2(m_i - m_sub - P_LOG2_SCALE)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    v = tl.load(v_base + offs_d[None, :] * L_PAD + offs_n[:, None])                     # [N, D]
    if PV_FP8:
        if SOFT_ROUND:
            p = _round_to_e4m3_mantissa(p)
        p = p.to(tl.float8e4nv)
    else:
        p = p.to(tl.float16)
    return tl.dot(p, v, acc), l_i, m_new


def _attention_configs():
    if INTERPRETED:  # the interpreter is slow; one small tile size (tests use it to hit tails)
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    # (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg), measured on an H200 (benchmarks/RESULTS.md).
    # Triton waits for each tensor-core product before the softmax that reads it, so a CTA's softmax
    # and its products never overlap. Left alone, ptxas gives the 128 x 64 tile 151 registers a
    # thread (sm_90, offline): two CTAs of 8 warps (77k registers) do not fit an SM's 64k. Held to
    # 128 (no spill), two CTAs share an SM and one's softmax runs while the other's tensor cores
    # work: 20% faster at Wan's self-attention shapes.
    shapes = [(128, 64, 8, 3, 128), (128, 64, 8, 2, 128), (64, 64, 4, 2, 128), (128, 128, 8, 3, None)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, maxnreg=r) for m, n, w, s, r in shapes]


# Tuned once per kind of call (self-attention over long key sequences or cross-attention to a few
# hundred keys; mask; fp8; lse), not per length: every Wan self-attention shape prefers the same tiles,
# and each tuning costs a few seconds at 75k tokens. Lq, Lk and LONG_KEYS are not specialized on, so
# a new length does not compile again.
@triton.autotune(configs=_attention_configs(), key=["LONG_KEYS", "HAS_MASK", "PV_FP8", "RETURN_LSE"])
@triton.jit(do_not_specialize=["Lq", "Lk", "LONG_KEYS"])
def _sage_attention_kernel(Q, QS, K, KS, V, VS, BIAS, SHIFT, O, LSE,
                           H, Lq, Lk, LONG_KEYS, LQ_PAD, L_PAD, N_QS, N_KS,
                           stride_ob, stride_ol, stride_oh,
                           HEAD_DIM: tl.constexpr, QUANT_BLOCK: tl.constexpr, K_QUANT_BLOCK: tl.constexpr,
                           HAS_MASK: tl.constexpr, PV_FP8: tl.constexpr, RETURN_LSE: tl.constexpr,
                           P_LOG2_SCALE: tl.constexpr, SOFT_ROUND: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of BLOCK_M queries of one (batch, head).

    Q int8 [B, H, LQ_PAD, D], QS [B, H, N_QS]; K int8 [B, H, L_PAD, D], KS [B, H, N_KS];
    V [B, H, D, L_PAD] (fp8 or fp16), VS [B, H, D]; BIAS [B, L_PAD] (HAS_MASK); SHIFT [B, H, Lq]
    (RETURN_LSE) -> O [B, Lq, H, D] (strided), LSE [B, H, Lq] float32 (RETURN_LSE).
    LONG_KEYS: 1 for more than LONG_KEYS_ABOVE keys, else 0; read by the autotuner only.
    P_LOG2_SCALE: log2 of the factor p is scaled by (log2 448 with FP8 P, so p fills e4m3's range; 0 in fp16).
    """
    block_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets pass 2^31 at large B*H*L
    b, h = bh // H, bh % H
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + bh * LQ_PAD * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(QS + bh * N_QS + offs_m // QUANT_BLOCK)
    k_base, v_base = K + bh * L_PAD * HEAD_DIM, V + bh * HEAD_DIM * L_PAD
    ks_base, bias_base = KS + bh * N_KS, BIAS + b * L_PAD

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_MASK:  # the bias masks the padding too: every tile alike
        n_full = (Lk + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:         # whole tiles without a bounds check, then the partial one with it
        n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, bias_base, start_n, Lk,
                                     L_PAD, HEAD_DIM, BLOCK_N, K_QUANT_BLOCK, False, HAS_MASK, PV_FP8,
                                     P_LOG2_SCALE, SOFT_ROUND)
    if n_full < Lk:
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, bias_base, n_full, Lk,
                                     L_PAD, HEAD_DIM, BLOCK_N, K_QUANT_BLOCK, True, HAS_MASK, PV_FP8,
                                     P_LOG2_SCALE, SOFT_ROUND)

    v_scale = tl.load(VS + bh * HEAD_DIM + offs_d)
    empty = l_i == 0.0  # every key masked: output 0, log-sum-exp -inf
    out = acc * (1.0 / tl.where(empty, 1.0, l_i))[:, None] * v_scale[None, :]
    row = offs_m < Lq
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row[:, None])
    if RETURN_LSE:
        shift = tl.load(SHIFT + bh * Lq + offs_m, mask=row, other=0.0)
        lse = (m_i + tl.log2(tl.where(empty, 1.0, l_i)) - P_LOG2_SCALE) * LN2 + shift
        tl.store(LSE + bh * Lq + offs_m, tl.where(empty, float("-inf"), lse), mask=row)


# --- host side -----------------------------------------------------------------------------------

def fp8_supported(device):
    """Whether `device` has FP8 tensor cores (compute capability 8.9+); the interpreter emulates them."""
    if INTERPRETED:
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


LONG_KEYS_ABOVE = 2048  # more keys than this: self-attention (the autotuner's LONG_KEYS, the Hopper kernel's calls)
KERNELS = ("auto", "triton", "hopper")


_hopper_failed = []  # the error that turned the Hopper kernel off for this process, if any


def _hopper_module():
    """wanvideo.modules.sage_hopper, or None: Triton before 3.6 (its Gluon spells warp specialization
    otherwise; the kernel was written and measured with 3.6), or the kernel failed once (_hopper_failed)."""
    if _hopper_failed or tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        return None
    try:
        from . import sage_hopper
    except ImportError:
        return None
    return sage_hopper


def _capability(device):
    """The CUDA compute capability of device; None on a CPU, under the interpreter or on ROCm (whose
    gfx90a also reports 9.0)."""
    if INTERPRETED or device.type != "cuda" or torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability(device)


def hopper_kernel_applies(capability, lk, has_mask, pv_fp8, gluon_available):
    """Whether the warp-specialized Hopper kernel (sage_hopper) takes a call: a compute capability 9.0
    GPU, FP8 P/V, no key mask, and more than LONG_KEYS_ABOVE keys (where it was measured faster; the
    short cross-attention stays on the Triton kernel). capability is None on a CPU or under the interpreter."""
    return (capability == (9, 0) and pv_fp8 and not has_mask and lk > LONG_KEYS_ABOVE and gluon_available)


def hopper_kernel_for(q, lk, key_mask, pv_fp8, kernel="auto"):
    """sage_hopper where it takes this call (hopper_kernel_applies, kernel "auto" or "hopper"), else None;
    kernel "hopper" where it cannot run: ValueError with the reason."""
    if kernel == "triton":
        return None
    capability = _capability(q.device)
    hopper = _hopper_module() if capability == (9, 0) else None  # Gluon imported only where it can run
    if hopper_kernel_applies(capability, lk, key_mask is not None, pv_fp8, hopper is not None):
        return hopper
    if kernel == "hopper":
        gluon = "found" if hopper else ("not usable" if capability == (9, 0) else "not looked for")
        raise ValueError(
            f"sage_triton: the Hopper kernel needs a compute capability 9.0 GPU (got {capability}), FP8 P/V "
            f"(pv_fp8={pv_fp8}), no key mask (mask given: {key_mask is not None}), more than {LONG_KEYS_ABOVE} "
            f"keys (got {lk}) and Triton 3.6+'s Gluon ({gluon}); use kernel='auto'."
            + (f" It failed here before: {_hopper_failed[0]}" if _hopper_failed else ""))
    return None


def hopper_key_order(length):
    """Where quantize(permute_keys=True) stores each key of V: new[hopper_key_order(L)[s]] = old[s].
    Within each 16 keys, s = 16h + 8j + 2c + e goes to 16h + 4c + 2j + e: the order in which a thread
    of the Hopper kernel holds P's columns in its FP8 operand registers (see sage_hopper)."""
    s = torch.arange(length)
    return s - (s & 15) + 4 * ((s >> 1) & 3) + 2 * ((s >> 3) & 1) + (s & 1)


def _padded(length):
    return -(-length // PAD_TO) * PAD_TO


def quantize(q, k, v, pv_fp8=True, with_shift=False, key_mask=None, permute_keys=False):
    """The quantized operands of sage_attention.

    q [B, Lq, H, D], k and v [B, Lk, H, D], key_mask None or bool [B, Lk] (True = real key) ->
      dict(q [B, H, Lq_pad, D] int8, q_scale [B, H, Lq_pad / QUANT_BLOCK] fp32,
           k [B, H, Lk_pad, D] int8 (smoothed), k_scale [B, H, Lk_pad / K_QUANT_BLOCK] fp32,
           k_mean [B, H, D] fp32, v [B, H, D, Lk_pad] fp8 e4m3 (fp16 without pv_fp8),
           v_scale [B, H, D] fp32, shift [B, H, Lq] fp32 (with_shift) or None,
           bias [B, Lk_pad] fp32 (0 real key, -inf masked or padding; with key_mask) or None).
    q comes out multiplied by softmax_scale * log2(e); dequantized: q ~ q_int8 * q_scale per block.
    Masked keys take no part: not in k's mean nor v's scale, and quantized as 0.
    permute_keys: v's keys in hopper_key_order (the Hopper kernel's operand order).
    """
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    lq_pad, lk_pad = _padded(lq), _padded(lk)
    softmax_scale = 1.0 / math.sqrt(dim)
    dev = q.device
    if key_mask is None:
        bias = None
        k_mean = k.mean(dim=1, dtype=torch.float32)                                              # [B, H, D]
        v_min, v_max = torch.aminmax(v, dim=1)  # one read of v; |v| would be a full-size temporary
        v_amax = torch.maximum(v_max, -v_min)
    else:
        keep = key_mask.to(device=dev, dtype=torch.bool)
        bias = torch.full((batch, lk_pad), float("-inf"), dtype=torch.float32, device=dev)
        bias[:, :lk].masked_fill_(keep, 0.0)
        real = keep[:, :, None, None]  # where, not a 0/1 product: a NaN or inf in padding times 0 is NaN
        k_mean = torch.where(real, k, 0).sum(dim=1, dtype=torch.float32) / keep.sum(dim=1).clamp_min(1)[:, None, None]
        v_amax = torch.where(real, v, 0).abs().amax(dim=1)
    k_mean = k_mean.contiguous()
    # Per-channel V scale to e4m3's range; the tiny floor keeps an all-zero channel finite.
    v_scale = (v_amax.float() / FP8_MAX).clamp_min(1e-30).contiguous()                        # [B, H, D]
    has_mask = bias is not None
    bias_arg = bias if has_mask else k_mean  # never read without a mask

    out = dict(k_mean=k_mean, v_scale=v_scale, shift=None, bias=bias)
    out["q"] = torch.empty(batch, heads, lq_pad, dim, dtype=torch.int8, device=dev)
    out["q_scale"] = torch.empty(batch, heads, lq_pad // QUANT_BLOCK, dtype=torch.float32, device=dev)
    out["k"] = torch.empty(batch, heads, lk_pad, dim, dtype=torch.int8, device=dev)
    out["k_scale"] = torch.empty(batch, heads, lk_pad // K_QUANT_BLOCK, dtype=torch.float32, device=dev)
    out["v"] = torch.empty(batch, heads, dim, lk_pad, device=dev,
                           dtype=torch.float8_e4m3fn if pv_fp8 else torch.float16)
    shift = torch.empty(batch, heads, lq, dtype=torch.float32, device=dev) if with_shift else out["q_scale"]
    if with_shift:
        out["shift"] = shift

    _quantize_qk_kernel[(lq_pad // QUANT_BLOCK, batch * heads)](
        q, k_mean, bias_arg, out["q"], out["q_scale"], shift, lq, heads, q.stride(0), q.stride(1), q.stride(2),
        lq_pad, lq_pad // QUANT_BLOCK, softmax_scale * LOG2E, softmax_scale,
        HEAD_DIM=dim, QUANT_BLOCK=QUANT_BLOCK, HAS_MASK=False, SUBTRACT_MEAN=False, COMPUTE_SHIFT=with_shift,
        num_warps=8)  # 8 warps: 167 registers a thread for the 64 x 128 block where 4 warps need 255
    _quantize_qk_kernel[(lk_pad // K_QUANT_BLOCK, batch * heads)](
        k, k_mean, bias_arg, out["k"], out["k_scale"], shift, lk, heads, k.stride(0), k.stride(1), k.stride(2),
        lk_pad, lk_pad // K_QUANT_BLOCK, 1.0, 1.0,
        HEAD_DIM=dim, QUANT_BLOCK=K_QUANT_BLOCK, HAS_MASK=has_mask, SUBTRACT_MEAN=True, COMPUTE_SHIFT=False,
        num_warps=8)
    _quantize_v_kernel[(lk_pad // QUANT_BLOCK, batch * heads)](
        v, v_scale, bias_arg, out["v"], lk, heads, v.stride(0), v.stride(1), v.stride(2), lk_pad,
        HEAD_DIM=dim, QUANT_BLOCK=QUANT_BLOCK, HAS_MASK=has_mask, SOFT_ROUND=INTERPRETED and pv_fp8,
        PERMUTE_KEYS=permute_keys)
    return out


def sage_attention(q, k, v, key_mask=None, return_lse=False, pv_fp8=None, kernel="auto"):
    """8-bit attention with the attention call's contract.

    q [B, Lq, H, 128], k and v [B, Lk, H, 128] (fp16, bf16 or fp32, any strides with a contiguous
    last dim); key_mask: optional bool [B, Lk], True where a key is real. Returns out [B, Lq, H, 128]
    in q's dtype, and with return_lse also lse [B, H, Lq] float32 (natural log-sum-exp of the
    scaled scores; -inf and out 0 where every key of a sample is masked), as attention_with_lse.
    pv_fp8: None picks FP8 P/V where the GPU has FP8 tensor cores, else fp16 P/V.
    kernel: "auto" runs the warp-specialized Hopper kernel (sage_hopper) where hopper_kernel_applies,
    else the Triton kernel of this module; "triton" always the latter; "hopper" the former or an error.
    """
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    if q.device.type != "cuda" and not (q.device.type == "cpu" and INTERPRETED):
        raise ValueError(f"sage_triton runs on CUDA tensors (on CPU only under TRITON_INTERPRET=1), got {q.device}.")
    if dim != HEAD_DIM:
        raise ValueError(f"sage_triton supports head dim {HEAD_DIM} only, got {dim}.")
    if kernel not in KERNELS:
        raise ValueError(f"sage_triton: kernel must be one of {KERNELS}, got {kernel!r}.")
    if k.shape != (batch, lk, heads, dim) or v.shape != k.shape:
        raise ValueError(f"sage_triton: k and v must be [B, Lk, H, D] matching q {tuple(q.shape)}; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}.")
    if pv_fp8 is None:
        pv_fp8 = fp8_supported(q.device)
        if not pv_fp8:
            _warn_once(("fp16", str(q.device)), "sage_triton: %s has no FP8 tensor cores (compute capability "
                       "below 8.9); P and V stay in fp16, Q and K in INT8.", q.device)
    hopper = hopper_kernel_for(q, lk, key_mask, pv_fp8, kernel)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if q.device.type == "cuda":
        # Triton launches on the current device: make it q's (block_distribution runs blocks on several GPUs).
        with torch.cuda.device(q.device):
            return _sage_attention(q, k, v, key_mask, return_lse, pv_fp8, hopper, kernel == "hopper")
    return _sage_attention(q, k, v, key_mask, return_lse, pv_fp8, hopper, kernel == "hopper")


def _sage_attention(q, k, v, key_mask, return_lse, pv_fp8, hopper, hopper_required):
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device) if return_lse else out
    if hopper is not None:
        ops = quantize(q, k, v, pv_fp8=pv_fp8, with_shift=return_lse, permute_keys=True)
        try:
            hopper.attend(ops, out, lse, lk)
            return (out, lse) if return_lse else out
        except Exception as error:  # e.g. a Gluon that compiles it otherwise: the Triton kernel from now on
            if hopper_required:
                raise
            _hopper_failed.append(f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
            logger.warning("sage_triton: the Hopper kernel failed (%s); the Triton kernel runs instead from now on.",
                           _hopper_failed[0])
    ops = quantize(q, k, v, pv_fp8=pv_fp8, with_shift=return_lse, key_mask=key_mask)
    has_mask = ops["bias"] is not None
    bias = ops["bias"] if has_mask else ops["v_scale"]  # additive: 0 real key, -inf masked or padding
    lk_pad = ops["k"].shape[2]
    shift = ops["shift"] if return_lse else ops["v_scale"]
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)
    _sage_attention_kernel[grid](
        ops["q"], ops["q_scale"], ops["k"], ops["k_scale"], ops["v"], ops["v_scale"], bias, shift, out, lse,
        heads, lq, lk, int(lk > LONG_KEYS_ABOVE), ops["q"].shape[2], lk_pad, ops["q_scale"].shape[2], ops["k_scale"].shape[2],
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=dim, QUANT_BLOCK=QUANT_BLOCK, K_QUANT_BLOCK=K_QUANT_BLOCK, HAS_MASK=has_mask, PV_FP8=pv_fp8,
        RETURN_LSE=return_lse, P_LOG2_SCALE=LOG2_FP8_MAX if pv_fp8 else 0.0, SOFT_ROUND=INTERPRETED and pv_fp8)
    return (out, lse) if return_lse else out
