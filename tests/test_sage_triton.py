"""attention_mode 'sage_triton' (wanvideo/modules/sage_triton.py) through Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported (triton's own jit functions, tl.sum
and the like, are built as interpreted or compiled then), and other test files may import triton
first. So the kernel tests (marked `interpreted`) run in a subprocess that starts with the variable
set: test_kernels_in_the_interpreter runs this file there. Run directly with TRITON_INTERPRET=1 they
run in-process. Shapes are tiny (B=2, H=2, D=128; odd lengths leave partial tiles and quantization
blocks); the interpreter runs tiles of 32 queries x 64 keys.
"""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from wanvideo.modules import sage_triton as st  # noqa: E402
from wanvideo.modules.attention import attention, available_backends, check_backend, make_attention_op  # noqa: E402
from wanvideo.parallel.distributed.attention import merge_partial_attention  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETING, reason="runs in test_kernels_in_the_interpreter's subprocess")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

D = 128
BLOCK_N = st._attention_configs()[0].kwargs["BLOCK_N"]  # the interpreter's one tile size (in its process)


@pytest.mark.skipif(INTERPRETING, reason="already in the interpreter")
def test_kernels_in_the_interpreter():
    """Every `interpreted` test of this file, in a fresh process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 13, result.stdout[-2000:]  # every interpreted test ran


def make_qkv(lq, lk, batch=2, heads=2, key_offset=4.0, seed=0):
    """q [B, Lq, H, D], k and v [B, Lk, H, D], fp32. Keys carry a large shared per-channel offset, as
    Wan's do: without the smoothing, INT8 keys would lose most of their resolution to it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, lq, heads, D, generator=g)
    k = torch.randn(batch, lk, heads, D, generator=g) + key_offset * torch.randn(heads, D, generator=g)
    v = torch.randn(batch, lk, heads, D, generator=g)
    return q, k, v


def exact(q, k, v, key_mask=None):
    """fp32 attention and its log-sum-exp: out [B, Lq, H, D], lse [B, H, Lq]."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(D)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v.double())
    return out.float(), lse.float()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(ops, lq, lk, key_mask=None, pv_fp8=True):
    """The kernel's math in plain fp32 torch, tile by tile of BLOCK_N keys as the kernel runs it,
    from the same quantized operands. -> out [B, Lq, H, D], lse [B, H, Lq] (without the smoothing shift)."""
    expand = lambda scale: scale.repeat_interleave(st.QUANT_BLOCK, dim=-1)
    q_int, k_int = ops["q"].float(), ops["k"].float()                                # [B, H, L_pad, D]
    s = (q_int @ k_int.transpose(-1, -2)) * (expand(ops["q_scale"])[..., :, None] * expand(ops["k_scale"])[..., None, :])
    s = s[:, :, :lq, :lk]                                                             # base-2 scores
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    v = ops["v"].float().transpose(-1, -2)[:, :, :lk]                                 # [B, H, Lk, D]
    p_log2_scale = st.LOG2_FP8_MAX if pv_fp8 else 0.0
    b, h = s.shape[:2]
    acc = torch.zeros(b, h, lq, D)
    l = torch.zeros(b, h, lq)
    m = torch.full((b, h, lq), float("-inf"))
    for start in range(0, lk, BLOCK_N):
        tile = s[..., start:start + BLOCK_N]
        m_new = torch.maximum(m, tile.amax(dim=-1))
        m_sub = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new) - p_log2_scale
        alpha = torch.exp2(m - m_sub - p_log2_scale)
        p = torch.exp2(tile - m_sub[..., None])
        l = l * alpha + p.sum(dim=-1)
        p = p.to(torch.float8_e4m3fn if pv_fp8 else torch.float16).float()
        acc = acc * alpha[..., None] + p @ v[:, :, start:start + BLOCK_N]
        m = m_new
    empty = l == 0
    out = acc / torch.where(empty, torch.ones_like(l), l)[..., None] * ops["v_scale"][:, :, None, :]
    lse = (m + torch.log2(torch.where(empty, torch.ones_like(l), l)) - p_log2_scale) * math.log(2)
    return out.transpose(1, 2), lse.masked_fill(empty, float("-inf"))


# --- quantization ---------------------------------------------------------------------------------

@interpreted
def test_quantized_operands_round_trip():
    """q and the smoothed k come back within half an INT8 step of their block's scale; v within e4m3's
    relative rounding; k's mean is taken out; padding rows are zero."""
    lq, lk = 17, 75
    q, k, v = make_qkv(lq, lk)
    ops = st.quantize(q, k, v, pv_fp8=True, with_shift=True)
    factor = st.LOG2E / math.sqrt(D)
    q_scale = ops["q_scale"].repeat_interleave(st.QUANT_BLOCK, dim=-1)[..., None]
    q_back = (ops["q"].float() * q_scale)[:, :, :lq].transpose(1, 2)
    assert (q_back - q * factor).abs().max() <= 0.5001 * ops["q_scale"].max()
    assert ops["q"][:, :, lq:].eq(0).all()

    assert torch.allclose(ops["k_mean"], k.mean(dim=1), atol=1e-5)
    smoothed = k - k.mean(dim=1, keepdim=True)
    k_scale = ops["k_scale"].repeat_interleave(st.QUANT_BLOCK, dim=-1)[..., None]
    k_back = (ops["k"].float() * k_scale)[:, :, :lk].transpose(1, 2)
    assert (k_back - smoothed).abs().max() <= 0.5001 * ops["k_scale"].max()
    # the smoothing is what makes the keys fine: their scale is far below that of the raw keys
    assert ops["k_scale"].max() < 0.5 * (k.abs().amax() / 127)

    assert ops["v"].dtype == torch.float8_e4m3fn
    v_back = (ops["v"].float() * ops["v_scale"][..., None])[..., :lk].permute(0, 3, 1, 2)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 (above its subnormal range, 2^-6 * scale)
    bound = 2.0 ** -4 * v.abs() + 2.0 ** -9 * ops["v_scale"][:, None] + 1e-7
    assert ((v_back - v).abs() <= bound).all()
    assert ops["v"][..., lk:].float().eq(0).all()

    shift = torch.einsum("bqhd,bhd->bhq", q, k.mean(dim=1)) / math.sqrt(D)
    assert torch.allclose(ops["shift"], shift, atol=1e-4)


@interpreted
def test_interpreter_fp8_rounding_is_that_of_the_gpu():
    """The interpreter's own fp32 -> e4m3 cast drops carries (why the module rounds first); with the
    rounding, V's fp8 copy equals torch's correctly rounded cast, carries included."""
    v = torch.tensor([0.499, 0.2495, 0.124, 0.49, 0.3, -0.499, 1.0, 448.0])  # amax 448: scale 1
    v = v.reshape(1, 8, 1, 1).expand(1, 8, 1, D).contiguous()
    ops = st.quantize(v, v, v, pv_fp8=True)
    got = ops["v"][0, 0, 0, :8].float() * ops["v_scale"][0, 0, 0]
    want = (v[0, :, 0, 0] / ops["v_scale"][0, 0, 0]).to(torch.float8_e4m3fn).float() * ops["v_scale"][0, 0, 0]
    assert torch.equal(got, want)


# --- the kernel -----------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("lq,lk", [(64, 64), (17, 75)])
@pytest.mark.parametrize("pv_fp8", [True, False])
def test_kernel_matches_reference_of_the_same_math(lq, lk, pv_fp8):
    q, k, v = make_qkv(lq, lk)
    out, lse = st.sage_attention(q, k, v, return_lse=True, pv_fp8=pv_fp8)
    ops = st.quantize(q, k, v, pv_fp8=pv_fp8, with_shift=True)
    want_out, want_lse = reference(ops, lq, lk, pv_fp8=pv_fp8)
    assert out.shape == q.shape and out.dtype == q.dtype
    # measured ~1e-7 and ~2e-6: the same fp32 operations; an fp8 rounding of p flipped by an ulp of
    # exp2 (numpy's against torch's) would move the output by ~1e-4 at most
    assert rel(out, want_out) <= 1e-4
    assert (lse - (want_lse + ops["shift"])).abs().max() <= 1e-4


@interpreted
@pytest.mark.parametrize("lq,lk", [(64, 64), (17, 75)])
def test_kernel_close_to_exact_attention(lq, lk):
    """Bounds from the quantization. INT8 Q/K per 64-token block: step amax/127 with amax ~4 sigma
    over a block, so each score moves by ~1% of its spread; with fp16 P/V that is 1.15-1.3% on the
    output (measured, 4 shapes x 3 seeds). e4m3 P and V keep 3 mantissa bits: ~2.6% RMS relative
    rounding each, ~3.6% together on i.i.d. random values, whose attention output has no common
    part to average the rounding against (the worst case; real activations do better): 3.5-3.7%
    measured. Bounds: 5% and 2%, about 1.4x the largest measured."""
    q, k, v = make_qkv(lq, lk)
    want, _ = exact(q, k, v)
    err_fp8 = rel(st.sage_attention(q, k, v, pv_fp8=True), want)
    err_fp16 = rel(st.sage_attention(q, k, v, pv_fp8=False), want)
    assert err_fp8 <= 5e-2
    assert err_fp16 <= 2e-2
    assert err_fp16 < err_fp8  # the fp8 P/V path really is the one in use


@interpreted
def test_bf16_inputs_and_strided_keys():
    """bf16 in, bf16 out; k and v as views into one packed tensor (strides other than contiguous)."""
    q, k, v = make_qkv(40, 70)
    kv = torch.stack([k, v], dim=2).bfloat16()                    # [B, Lk, 2, H, D]
    k_view, v_view = kv[:, :, 0], kv[:, :, 1]
    assert not k_view.is_contiguous()
    out = st.sage_attention(q.bfloat16(), k_view, v_view)
    assert out.dtype == torch.bfloat16
    assert rel(out, exact(q, k, v)[0]) <= 5e-2


@interpreted
def test_masked_keys_are_ignored_and_empty_rows_are_zero():
    lq, lk = 17, 75
    q, k, v = make_qkv(lq, lk)
    mask = torch.ones(2, lk, dtype=torch.bool)
    mask[1, 30:] = False                 # sample 1: ragged, only its first 30 keys are real
    mask[1, 3] = False                   # and one hole inside
    out, lse = st.sage_attention(q, k, v, key_mask=mask, return_lse=True)
    want_out, want_lse = exact(q, k, v, mask)
    assert rel(out, want_out) <= 5e-2
    assert (lse - want_lse).abs().max() <= 5e-2

    # garbage in the masked keys changes nothing at all: they take no part in the quantization either
    # (k's mean, the blocks' scales, v's scale), so a padding token cannot coarsen the real ones
    k2, v2 = k.clone(), v.clone()
    k2[1, 30:], v2[1, 30:] = 1e3, -1e3
    k2[1, 3], v2[1, 3] = 1e3, 1e3
    out2, lse2 = st.sage_attention(q, k2, v2, key_mask=mask, return_lse=True)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)

    # the same math as the reference, mask included
    ops = st.quantize(q, k, v, pv_fp8=True, with_shift=True, key_mask=mask)
    ref_out, ref_lse = reference(ops, lq, lk, key_mask=mask)
    assert rel(out, ref_out) <= 1e-4
    assert (lse - (ref_lse + ops["shift"])).abs().max() <= 1e-4

    mask[0] = False                      # sample 0: no real key at all
    out, lse = st.sage_attention(q, k, v, key_mask=mask, return_lse=True)
    assert out[0].eq(0).all() and torch.isneginf(lse[0]).all()
    assert torch.isfinite(out[1]).all()


@interpreted
def test_log_sum_exp_matches_exact_and_merges_across_key_chunks():
    """Ring attention attends to key chunks separately and merges with the log-sum-exp; each chunk is
    smoothed by its own mean, so the lse must carry the shift back for the merge to be right."""
    lq, lk = 33, 120
    q, k, v = make_qkv(lq, lk)
    want_out, want_lse = exact(q, k, v)
    out, lse = st.sage_attention(q, k, v, return_lse=True)
    # INT8 scores are off by ~1% of their spread: the lse by a few hundredths at most
    assert (lse - want_lse).abs().max() <= 3e-2
    parts = [st.sage_attention(q, k[:, s], v[:, s], return_lse=True) for s in (slice(0, 50), slice(50, lk))]
    merged_out, merged_lse = merge_partial_attention(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    assert rel(merged_out, want_out) <= 5e-2
    assert (merged_lse - want_lse).abs().max() <= 3e-2
    # without the shift the lse would be off by q . mean(k) (> 0.5 here): the merge would be wrong
    assert st.quantize(q, k, v, with_shift=True)["shift"].abs().max() > 0.5


# --- the attention call and the settings ---------------------------------------------------------

@interpreted
def test_attention_call_routes_to_the_kernel_and_falls_back_for_other_head_dims():
    q, k, v = make_qkv(17, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 20:] = False
    check_backend("sage_triton")  # the interpreter stands in for the GPU
    got = attention(q, k, v, key_mask=mask, backend="sage_triton")
    assert torch.equal(got, st.sage_attention(q, k, v, key_mask=mask))
    assert rel(got, exact(q, k, v, mask)[0]) <= 5e-2
    op = make_attention_op("sage_triton")  # what the model holds; torch.compile runs the kernel as is
    assert torch.equal(op(q, k, v, key_mask=mask), got)
    compiled = torch.compile(lambda q, k, v: op(q, k, v, key_mask=mask) * 2, backend="eager")
    assert torch.equal(compiled(q, k, v), got * 2)
    small = [t[..., :64].contiguous() for t in (q, k, v)]  # the tiny test models' heads: sdpa, exactly
    assert torch.equal(attention(*small, key_mask=mask, backend="sage_triton"),
                       attention(*small, key_mask=mask, backend="sdpa"))


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="checks the refusal on a machine without a GPU")
def test_refused_in_one_line_without_a_gpu():
    from wanvideo.pipeline import LoadSettings
    assert "sage_triton" not in available_backends()
    for attempt in (lambda: check_backend("sage_triton"), lambda: LoadSettings(attention_mode="sage_triton")):
        with pytest.raises(ValueError, match="'sage_triton'.*NVIDIA.*choose 'sdpa'") as error:
            attempt()
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="CUDA tensors"):
        st.sage_attention(*make_qkv(8, 8))
    with pytest.raises(ValueError, match="Unknown attention backend 'sage'"):
        LoadSettings(attention_mode="sage")
    LoadSettings(attention_mode="sdpa")


@interpreted
def test_head_dim_other_than_128_is_refused_by_the_kernel():
    q = torch.randn(1, 8, 1, 64)
    with pytest.raises(ValueError, match="head dim 128"):
        st.sage_attention(q, q, q)
