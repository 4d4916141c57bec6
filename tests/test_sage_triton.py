"""attention_mode 'sage_triton' (wanvideo/modules/sage_triton.py) through Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported (triton's own jit functions, tl.sum
and the like, are built as interpreted or compiled then), and other test files may import triton
first. So the kernel tests (marked `interpreted`) run in a subprocess that starts with the variable
set: test_kernels_in_the_interpreter runs this file there. Run directly with TRITON_INTERPRET=1 they
run in-process. Shapes are tiny (B=2, H=2, D=128; odd lengths leave partial tiles and quantization
blocks); the interpreter runs tiles of 32 queries x 64 keys.

attention_mode 'auto' is checked in this process with an injected timer (which backend it picks,
that it decides once per shape, where it times nothing), and in the interpreter with the real
kernel, on two gloo ranks of a ring too.
"""
import functools
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from conftest import relative_error as rel  # noqa: E402
from wanvideo.modules import attention as attention_module  # noqa: E402
from wanvideo.modules import sage_triton as st  # noqa: E402
from wanvideo.modules.attention import attention, available_backends, check_backend, make_attention_op  # noqa: E402
from wanvideo.parallel.distributed import attention as ring_module  # noqa: E402
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
    assert passed and int(passed.group(1)) >= 20, result.stdout[-2000:]  # every interpreted test ran


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


def reference(ops, lq, lk, key_mask=None, pv_fp8=True):
    """The kernel's math in plain fp32 torch, tile by tile of BLOCK_N keys as the kernel runs it, from
    the same quantized operands. -> out [B, Lq, H, D], lse [B, H, Lq] (without the smoothing shift)."""
    q_scale = ops["q_scale"].repeat_interleave(st.QUANT_BLOCK, dim=-1)
    k_scale = ops["k_scale"].repeat_interleave(st.K_QUANT_BLOCK, dim=-1)
    q_int, k_int = ops["q"].float(), ops["k"].float()                                # [B, H, L_pad, D]
    s = (q_int @ k_int.transpose(-1, -2)) * (q_scale[..., :, None] * k_scale[..., None, :])
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
@pytest.mark.parametrize("lk", [75, 300])
def test_quantized_operands_round_trip(lk):
    """q and the smoothed k come back within half an INT8 step of their own block's scale (300 keys:
    three K blocks); v within e4m3's relative rounding; k's mean is taken out; padding rows are zero."""
    lq = 17
    q, k, v = make_qkv(lq, lk)
    ops = st.quantize(q, k, v, pv_fp8=True, with_shift=True)
    factor = st.LOG2E / math.sqrt(D)
    q_scale = ops["q_scale"].repeat_interleave(st.QUANT_BLOCK, dim=-1)[..., None]
    q_back = (ops["q"].float() * q_scale)[:, :, :lq].transpose(1, 2)
    assert (q_back - q * factor).abs().max() <= 0.5001 * ops["q_scale"].max()
    assert ops["q"][:, :, lq:].eq(0).all()

    assert torch.allclose(ops["k_mean"], k.mean(dim=1), atol=1e-5)
    smoothed = k - k.mean(dim=1, keepdim=True)
    k_scale = ops["k_scale"].repeat_interleave(st.K_QUANT_BLOCK, dim=-1)[..., None]   # [B, H, L_pad, 1]
    k_error = (ops["k"].float() * k_scale)[:, :, :lk] - smoothed.transpose(1, 2)
    assert (k_error.abs() <= 0.5001 * k_scale[:, :, :lk]).all()
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
def test_v_stored_in_the_hopper_key_order():
    """quantize(permute_keys=True) (for the Hopper kernel) stores V's keys at hopper_key_order's
    positions, with a mask and a partial last block too; everything else is unchanged."""
    q, k, v = make_qkv(17, 300)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 170:] = False
    for key_mask in (None, mask):
        plain = st.quantize(q, k, v, key_mask=key_mask)
        permuted = st.quantize(q, k, v, key_mask=key_mask, permute_keys=True)
        want = torch.empty_like(plain["v"].float())
        want[..., st.hopper_key_order(want.shape[-1])] = plain["v"].float()
        assert torch.equal(permuted["v"].float(), want)
        assert not torch.equal(permuted["v"].float(), plain["v"].float())
        for name in ("q", "q_scale", "k", "k_scale", "v_scale"):
            assert torch.equal(permuted[name], plain[name]), name


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
@pytest.mark.parametrize("lq,lk", [(64, 64), (17, 75), (20, 300), (33, 128)])
@pytest.mark.parametrize("pv_fp8", [True, False])
def test_kernel_matches_reference_of_the_same_math(lq, lk, pv_fp8):
    """300 keys are 5 tiles of 64 across 3 K scale blocks; 128 keys fill the padding (no partial tile)."""
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
    """Bounds from the quantization. INT8 Q per 64-token block, K per 128: step amax/127 with amax ~4 sigma
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
    k2[1, 40], v2[1, 41] = float("nan"), float("inf")  # not even a NaN or inf in padding
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


@interpreted
def test_hopper_tail_parts_combine_into_attention():
    """sage_hopper's tail items come back from key-range parts (unnormalized output, row maximum and
    sum in the kernel's log2 units, as its epilogue stores them): the combine kernel writes exactly
    those items' rows of a strided output, equal to attention over all keys, and their log-sum-exp."""
    sh = pytest.importorskip("wanvideo.modules.sage_hopper")
    batch, heads, lq, lk, splits, whole = 2, 3, 200, 300, 3, 7   # 2 query blocks a head: items 7-11 are the tail
    q, k, v = make_qkv(lq, lk, batch=batch, heads=heads)
    blocks = -(-lq // sh.BLOCK_M)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(D) * st.LOG2E   # log2 units
    v_scale = torch.rand(batch, heads, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    shift = torch.randn(batch, heads, lq, generator=torch.Generator().manual_seed(2))
    part_o, part_ml = [], []
    for item in range(whole, blocks * batch * heads):
        bh, block = divmod(item, blocks)
        b, h = divmod(bh, heads)
        rows = torch.arange(block * sh.BLOCK_M, (block + 1) * sh.BLOCK_M).clamp(max=lq - 1)  # padding rows: any finite
        for keys in torch.arange(lk).chunk(splits):
            s = scores[b, h][rows][:, keys]
            m = s.amax(1) + 1.5                                   # any reference above the maximum will do
            p = torch.exp2(s - m[:, None] + st.LOG2_FP8_MAX)
            part_o.append(p @ (v[b, keys, h].double() / v_scale[b, h]))
            part_ml.append(torch.stack([m, p.sum(1)], 1))
    part_o, part_ml = torch.cat(part_o).float(), torch.cat(part_ml).float()
    out = torch.full((batch, lq, heads + 1, D), float("nan"))[:, :, :heads]   # strided, as the model's views
    lse = torch.full((batch, heads, lq), float("nan"))
    sh.combine_tail(part_o, part_ml, v_scale.float(), shift, out, lse, whole, blocks * batch * heads - whole, splits,
                    blocks, heads, True)
    want, want_lse = exact(q, k, v)
    done = torch.zeros(batch, heads, lq, dtype=torch.bool)
    for item in range(whole, blocks * batch * heads):
        bh, block = divmod(item, blocks)
        done[bh // heads, bh % heads, block * sh.BLOCK_M:(block + 1) * sh.BLOCK_M] = True
    assert done.any() and not done.all()
    got, expected = out.permute(0, 2, 1, 3)[done], want.permute(0, 2, 1, 3)[done]
    assert rel(got, expected) <= 1e-5
    assert (lse[done] - (want_lse[done] + shift[done])).abs().max() <= 1e-4
    assert out.permute(0, 2, 1, 3)[~done].isnan().all() and lse[~done].isnan().all()   # the whole items' rows untouched


@pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA GPU")
@pytest.mark.parametrize("lq,lk", [(300, 300), (1000, 77), (130, 2100)])
def test_compiled_kernel_on_the_gpu(lq, lk):
    """The kernel as the GPU compiles and tunes it (its own tile sizes and register limit): close
    to exact attention with a ragged mask, the log-sum-exp too; padding content changes nothing."""
    q, k, v = (t.cuda() for t in make_qkv(lq, lk))
    mask = torch.ones(2, lk, dtype=torch.bool, device="cuda")
    mask[1, lk // 2:] = False
    out, lse = st.sage_attention(q, k, v, key_mask=mask, return_lse=True)
    want_out, want_lse = exact(q, k, v, mask)
    assert rel(out, want_out) <= 5e-2
    assert (lse - want_lse).abs().max() <= 3e-2
    k2, v2 = k.clone(), v.clone()
    k2[1, lk // 2:], v2[1, lk // 2:] = float("nan"), 1e4
    out2, lse2 = st.sage_attention(q, k2, v2, key_mask=mask, return_lse=True)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    assert rel(st.sage_attention(q, k, v), exact(q, k, v)[0]) <= 5e-2  # no mask: the unchecked whole tiles


@pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA GPU")
def test_every_tuning_config_on_the_gpu(monkeypatch):
    """Each configuration the autotuner may pick (tile sizes, warps, stages, register limit), run
    alone: all close to exact attention, with and without a ragged mask, 300 keys (a partial tile)."""
    kernel = st._sage_attention_kernel
    q, k, v = (t.cuda() for t in make_qkv(130, 300))
    mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    mask[1, 170:] = False
    want_masked, want_lse = exact(q, k, v, mask)
    want = exact(q, k, v)[0]
    try:
        for config in st._attention_configs():
            monkeypatch.setattr(kernel, "configs", [config])
            kernel.cache.clear()
            out, lse = st.sage_attention(q, k, v, key_mask=mask, return_lse=True)
            assert kernel.best_config is config  # this configuration ran
            assert rel(out, want_masked) <= 5e-2, config
            assert (lse - want_lse).abs().max() <= 3e-2, config
            assert rel(st.sage_attention(q, k, v), want) <= 5e-2, config
    finally:
        kernel.cache.clear()  # later calls tune over every configuration again


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


# --- attention_mode 'auto' ------------------------------------------------------------------------

class FakeTimer:
    """Stands in for the CUDA-event timer: runs what it is given once (as the real one does) and
    returns the milliseconds it was told to; remembers which backend it timed, in order."""

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, backend, run, device):
        self.calls.append(backend)
        run()
        return self.ms[backend]


def _recording_backends(monkeypatch):
    """Replace sdpa and sage_triton by recorders whose outputs say who ran (4.0: sdpa, 11.0:
    sage_triton, the names' lengths); returns the list of names in the order they ran."""
    ran = []

    def recorder(name):
        def run(q, k, v, key_mask):
            ran.append(name)
            return torch.full_like(q, float(len(name)))
        return run

    for name in ("sdpa", "sage_triton"):
        monkeypatch.setitem(attention_module._IMPLEMENTATIONS, name, recorder(name))
    return ran


def _auto_with(monkeypatch, ms, skip_reason=lambda q: None):
    """AUTO replaced by a chooser with a FakeTimer of `ms`; skip_reason None: every input is a candidate
    (as on a GPU). Returns the timer."""
    timer = FakeTimer(ms)
    monkeypatch.setattr(attention_module, "AUTO", attention_module.AutoAttention(timer=timer, skip_reason=skip_reason))
    return timer


@pytest.mark.skipif(INTERPRETING, reason="logic only, no kernel")
def test_auto_picks_the_faster_and_decides_once_per_shape(monkeypatch, caplog):
    ran = _recording_backends(monkeypatch)
    timer = _auto_with(monkeypatch, {"sdpa": 2.0, "sage_triton": 1.5})
    q, k, v = make_qkv(16, 16)
    with caplog.at_level("INFO", logger="wanvideo.modules.attention"):
        out = attention(q, k, v, backend="auto")
    assert out.eq(11.0).all()                                   # sage_triton's output
    assert timer.calls == ["sdpa", "sage_triton"]                # each timed once, on the call's inputs
    assert ran == ["sdpa", "sage_triton", "sage_triton"]         # timing runs both, then the choice runs
    decision_logs = [r.getMessage() for r in caplog.records if "attention 'auto'" in r.getMessage()]
    assert len(decision_logs) == 1
    assert re.search(r"sage_triton for self-attention \(batch 2, 2 heads, 16 x 16 tokens, float32, cpu\): "
                     r"sdpa 2\.000 ms, sage_triton 1\.500 ms", decision_logs[0])

    caplog.clear()
    with caplog.at_level("INFO", logger="wanvideo.modules.attention"):
        attention(q + 1, k, v, backend="auto")                   # same shape: looked up, not timed
    assert timer.calls == ["sdpa", "sage_triton"] and ran[-1] == "sage_triton" and len(ran) == 4
    assert not [r for r in caplog.records if "attention 'auto'" in r.getMessage()]

    cross_k, cross_v = k[:, :7], v[:, :7]                        # a new shape (cross-attention): timed again
    attention(q, cross_k, cross_v, backend="auto")
    mask = torch.ones(2, 16, dtype=torch.bool)
    attention(q, k, v, key_mask=mask, backend="auto")            # with a mask: another decision
    assert timer.calls == ["sdpa", "sage_triton"] * 3
    assert len(attention_module.AUTO.decisions) == 3


@pytest.mark.skipif(INTERPRETING, reason="logic only, no kernel")
@pytest.mark.parametrize("sage_ms", [2.5, 2.0])
def test_auto_keeps_sdpa_unless_sage_triton_is_strictly_faster(monkeypatch, sage_ms):
    ran = _recording_backends(monkeypatch)
    timer = _auto_with(monkeypatch, {"sdpa": 2.0, "sage_triton": sage_ms})
    q, k, v = make_qkv(16, 16)
    assert attention(q, k, v, backend="auto").eq(4.0).all()
    assert timer.calls == ["sdpa", "sage_triton"] and ran == ["sdpa", "sage_triton", "sdpa"]


@pytest.mark.skipif(INTERPRETING, reason="logic only, no kernel")
def test_auto_is_sdpa_without_timing_on_cpu(monkeypatch, caplog):
    """The real skip rule on this CPU: nothing is timed, and the result is sdpa's, bit for bit."""
    def timer(*args):
        raise AssertionError("auto timed something on a CPU")
    monkeypatch.setattr(attention_module, "AUTO", attention_module.AutoAttention(timer=timer))
    q, k, v = make_qkv(16, 24)
    with caplog.at_level("INFO", logger="wanvideo.modules.attention"):
        got = attention(q, k, v, backend="auto")
        attention(q, k[:, :5], v[:, :5], backend="auto")
    assert torch.equal(got, attention(q, k, v, backend="sdpa"))
    skips = [r.getMessage() for r in caplog.records if "without timing" in r.getMessage()]
    assert skips == ["attention 'auto': sdpa, without timing, for cpu tensors (sage_triton runs on NVIDIA GPUs)."]
    # the model's op: compiled or not, the same
    op = make_attention_op("auto")
    assert torch.equal(op(q, k, v), got)


def test_auto_skip_rule():
    reason = attention_module.sage_triton_skip_reason
    assert "cpu tensors" in reason("cpu", 128)
    assert "ROCm" in reason("cuda", 128, True, (9, 4), rocm=True)
    assert reason("cuda", 128, triton_installed=False, capability=(9, 0)) == "triton is not installed"
    assert reason("cuda", 64, True, (9, 0)) == "head dim 64 (sage_triton takes 128)"
    assert "compute capability 7.5" in reason("cuda", 128, True, (7, 5))
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0)):  # without FP8 (Ampere) too: timed, fp16 P/V
        assert reason("cuda", 128, True, capability) is None


@pytest.mark.skipif(INTERPRETING, reason="logic only, no kernel")
def test_auto_falls_back_to_sdpa_when_sage_triton_fails_to_run(monkeypatch, caplog):
    ran = _recording_backends(monkeypatch)

    def broken(q, k, v, key_mask):
        raise RuntimeError("PTX not supported\nmore lines")
    monkeypatch.setitem(attention_module._IMPLEMENTATIONS, "sage_triton", broken)
    timer = _auto_with(monkeypatch, {"sdpa": 2.0, "sage_triton": 1.0})
    q, k, v = make_qkv(16, 16)
    with caplog.at_level("WARNING", logger="wanvideo.modules.attention"):
        assert attention(q, k, v, backend="auto").eq(4.0).all()
        assert attention(q, k, v, backend="auto").eq(4.0).all()   # decided: not tried again
    assert timer.calls == ["sdpa", "sage_triton"] and ran == ["sdpa", "sdpa", "sdpa"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["attention 'auto': sage_triton failed on cpu (RuntimeError: PTX not supported); "
                        "using sdpa for this shape."]


@pytest.mark.skipif(INTERPRETING, reason="no kernel")
def test_auto_is_offered_everywhere_and_sdpa_stays_the_default(capsys, monkeypatch):
    import dataclasses
    import logging
    from wanvideo.parallel.distributed import worker
    from wanvideo.pipeline import LoadSettings
    modes = available_backends()
    assert modes[0] == "sdpa" and modes[-1] == "auto"
    check_backend("auto")
    assert LoadSettings(attention_mode="auto").attention_mode == "auto"
    assert {f.name: f.default for f in dataclasses.fields(LoadSettings)}["attention_mode"] == "sdpa"
    # the torchrun worker's --attention: 'auto' passes the parser (it then stops: no torchrun here)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # the worker's, not this test process's
    for argv, message in ((["--attention", "auto"], "run me under torchrun"),
                          (["--attention", "fastest"], "invalid choice: 'fastest'")):
        with pytest.raises(SystemExit):
            worker.main(["--checkpoint", "x.safetensors"] + argv)
        assert message in capsys.readouterr().err


@pytest.mark.skipif(INTERPRETING, reason="logic only, no kernel")
def test_ring_partial_attention_follows_the_mode(monkeypatch):
    """attention_with_lse: sage_triton where the kernel runs (not here: head dim 16 on a CPU without the
    interpreter) else PyTorch's path, bit for bit; auto times the lse variants, per shape, separately
    from the plain call's decisions."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 2, 16, generator=g) for n in (9, 11, 11))
    want = ring_module.attention_with_lse(q, k, v)
    got = ring_module.attention_with_lse(q, k, v, backend="sage_triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    ran = []

    def fake_sage_with_lse(q, k, v, key_mask):
        ran.append("sage_triton")
        return torch.full(q.shape, 11.0), torch.zeros(q.shape[0], q.shape[2], q.shape[1])
    monkeypatch.setattr(ring_module, "_sage_attention_with_lse", fake_sage_with_lse)
    monkeypatch.setattr(ring_module, "sage_triton_runs_on", lambda q: True)  # as on a GPU
    timer = _auto_with(monkeypatch, {"sdpa": 2.0, "sage_triton": 1.0})
    for _ in range(2):
        out, _ = ring_module.attention_with_lse(q, k, v, backend="auto")
        assert out.eq(11.0).all()
    assert timer.calls == ["sdpa", "sage_triton"] and ran == ["sage_triton"] * 3  # timed once, ran twice
    assert [key[0] for key in attention_module.AUTO.decisions] == [True]          # the lse kind of decision
    out, _ = ring_module.attention_with_lse(q, k, v, backend="auto", fused=False)  # exact: never the kernel
    assert torch.equal(out, ring_module.attention_with_lse(q, k, v, fused=False)[0])

    # the sequence-parallel op reads the mode from the op it replaces
    assert ring_module.SequenceParallelAttention(make_attention_op("auto"), None, None).backend == "auto"
    sage_op = functools.partial(attention, backend="sage_triton")  # what make_attention_op makes on a GPU
    assert ring_module.SequenceParallelAttention(sage_op, None, None).backend == "sage_triton"
    assert ring_module.SequenceParallelAttention(lambda *a, **kw: None, None, None).backend == "sdpa"


@interpreted
def test_auto_runs_the_kernel_where_it_measured_faster(monkeypatch):
    """With the real kernel (the interpreter): 'auto' returns exactly sage_triton's output where it
    was faster, exactly sdpa's where not."""
    q, k, v = make_qkv(17, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    timer = _auto_with(monkeypatch, {"sdpa": 2.0, "sage_triton": 1.0})
    assert torch.equal(attention(q, k, v, key_mask=mask, backend="auto"), st.sage_attention(q, k, v, key_mask=mask))
    assert timer.calls == ["sdpa", "sage_triton"]
    _auto_with(monkeypatch, {"sdpa": 1.0, "sage_triton": 2.0})
    assert torch.equal(attention(q, k, v, key_mask=mask, backend="auto"), attention(q, k, v, mask, backend="sdpa"))


# --- ring attention with the kernel, on two gloo ranks --------------------------------------------

RING_TOKENS = 80  # two ring chunks of 40 keys: partial tiles and quantization blocks in each


def _ring_inputs():
    q, k, v = make_qkv(RING_TOKENS, RING_TOKENS, seed=5)
    ragged = torch.ones(2, RING_TOKENS, dtype=torch.bool)
    ragged[1, 60:] = False  # sample 1 shorter: the ring's per-chunk masks (ChunkKeys.masks)
    ragged[1, 10] = False
    return q, k, v, ragged


def _ring_rank(rank, port, folder):
    """One of two gloo ranks of a ring of two: the model's self-attention op, for each attention mode,
    with and without a ragged mask, on this rank's half of the sequence; saves the outputs and how
    often the kernel ran with return_lse."""
    import torch.distributed as dist
    from wanvideo.parallel.distributed.topology import ParallelDegrees, ParallelGroups
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        groups = ParallelGroups(ParallelDegrees(cfg=1, ulysses=1, ring=2))
        kernel_calls = []
        kernel = st.sage_attention

        def counted(*args, **kwargs):
            kernel_calls.append(kwargs.get("return_lse", False))
            return kernel(*args, **kwargs)
        st.sage_attention = counted
        timed = []

        def timer(backend, run, device):  # the kernel favoured; run() not called: the counts stay the ring's
            timed.append(backend)
            return {"sdpa": 2.0, "sage_triton": 1.0}[backend]
        attention_module.AUTO = attention_module.AutoAttention(timer=timer, skip_reason=lambda q: None)
        q, k, v, ragged = _ring_inputs()
        shard = slice(rank * RING_TOKENS // 2, (rank + 1) * RING_TOKENS // 2)
        results = {}
        for mode in ("sdpa", "sage_triton", "auto"):
            for masked in (False, True):
                op = ring_module.SequenceParallelAttention(make_attention_op(mode), groups,
                                                           ring_module.KeyMaskGather(groups))
                before = len(kernel_calls)
                out = op(q[:, shard], k[:, shard], v[:, shard], key_mask=ragged[:, shard] if masked else None)
                results[f"{mode}/{masked}"] = (out, kernel_calls[before:])
        torch.save({"results": results, "timed": timed}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@interpreted
def test_ring_attention_with_the_kernel_equals_single_process_kernel(tmp_path):
    """Ring attention (ring degree 2, gloo) with attention_mode sage_triton merges the kernel's partial
    attentions by their log-sum-exp: the result is single-process sage_triton's within the kernel's
    quantization error (each chunk is smoothed and quantized on its own, so not bit for bit), and so
    is auto's where the (injected) timing favours the kernel; sdpa's ring stays exact."""
    import torch.multiprocessing as mp
    from conftest import free_port
    mp.spawn(_ring_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    q, k, v, ragged = _ring_inputs()
    for masked in (False, True):
        mask = ragged if masked else None
        whole = lambda mode: torch.cat([ranks[r]["results"][f"{mode}/{masked}"][0] for r in range(2)], dim=1)
        calls = lambda mode: [ranks[r]["results"][f"{mode}/{masked}"][1] for r in range(2)]
        want, _ = exact(q, k, v, mask)
        single = st.sage_attention(q, k, v, key_mask=mask)
        assert rel(whole("sdpa"), want) <= 1e-5 and calls("sdpa") == [[], []]
        for mode in ("sage_triton", "auto"):
            ring = whole(mode)
            assert calls(mode) == [[True, True], [True, True]]  # the kernel, with its lse, for both chunks
            # Measured (4 seeds, with and without the mask): ring 3.3-3.4% from exact, single 3.5-3.6%,
            # ring from single 3.9-4.1% (two independent roundings of ~3.5%). Bounds ~1.35x of those.
            assert rel(ring, want) <= 5e-2 and rel(single, want) <= 5e-2
            assert rel(ring, want) <= 1.2 * rel(single, want)       # the ring loses nothing to the merge
            assert rel(ring, single) <= 5.5e-2, (mode, masked)
            assert rel(ring, whole("sdpa")) > 1e-3                  # not the sdpa path
        assert torch.equal(whole("auto"), whole("sage_triton"))
    # auto timed each chunk shape once per rank: without a mask, and with one
    assert [rank["timed"] for rank in ranks] == [["sdpa", "sage_triton"] * 2] * 2


@pytest.mark.skipif(INTERPRETING, reason="no kernel")
def test_a_model_loaded_with_auto_runs_as_with_sdpa_on_cpu(tmp_path, monkeypatch):
    """The loader wires 'auto' into every attention of the model; on a CPU it is sdpa, bit for bit,
    and nothing is timed."""
    from wanvideo.checkpoint import load_wan_model
    from wanvideo.tiny import make_tiny_checkpoint

    def timer(*args):
        raise AssertionError("auto timed something on a CPU")
    monkeypatch.setattr(attention_module, "AUTO", attention_module.AutoAttention(timer=timer))
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v")
    models = {mode: load_wan_model(path, base_precision="fp32", attention_mode=mode) for mode in ("sdpa", "auto")}
    assert all(attention_module.op_backend(block.self_attn.attn_op) == "auto" and
               attention_module.op_backend(block.cross_attn.attn_op) == "auto" for block in models["auto"].blocks)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(16, 3, 6, 10, generator=g), torch.randn(7, 32, generator=g)
    with torch.no_grad():
        outs = {mode: model([x], torch.tensor([500.0]), [context])[0] for mode, model in models.items()}
    assert torch.equal(outs["auto"], outs["sdpa"])
    assert len(attention_module.AUTO.decisions) >= 2   # self- and cross-attention shapes, decided (as sdpa)


@interpreted
def test_hopper_kernel_refused_where_it_cannot_run():
    """kernel='hopper' off a compute capability 9.0 GPU (here the interpreter) is refused with the
    reason; an unknown kernel name too; 'triton' and 'auto' run this module's kernel."""
    q, k, v = make_qkv(17, 75)
    with pytest.raises(ValueError, match=r"compute capability 9\.0 GPU \(got None\)"):
        st.sage_attention(q, k, v, kernel="hopper")
    with pytest.raises(ValueError, match="kernel must be one of"):
        st.sage_attention(q, k, v, kernel="gluon")
    assert rel(st.sage_attention(q, k, v, kernel="triton"), exact(q, k, v)[0]) <= 5e-2


@interpreted
def test_a_failing_hopper_kernel_hands_over_to_the_triton_kernel(monkeypatch, caplog):
    """Where the Hopper kernel is chosen but fails (a Triton whose Gluon compiles it otherwise), the
    call still returns the Triton kernel's result, a warning says why, and later calls do not try
    it again; asked for explicitly, its error propagates."""
    calls = []

    class BrokenHopper:
        @staticmethod
        def attend(*args):
            calls.append(args)
            raise RuntimeError("gluon says no")

    monkeypatch.setattr(st, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(st, "_hopper_module", lambda: None if st._hopper_failed else BrokenHopper)
    monkeypatch.setattr(st, "_hopper_failed", [])
    monkeypatch.setattr(st, "LONG_KEYS_ABOVE", 64)
    q, k, v = make_qkv(17, 75)
    with pytest.raises(RuntimeError, match="gluon says no"):
        st.sage_attention(q, k, v, kernel="hopper")
    assert len(calls) == 1 and not st._hopper_failed
    with caplog.at_level("WARNING", logger=st.logger.name):
        out, lse = st.sage_attention(q, k, v, return_lse=True)
    assert len(calls) == 2 and "gluon says no" in caplog.text and "Triton kernel runs instead" in caplog.text
    want, want_lse = st.sage_attention(q, k, v, return_lse=True, kernel="triton")
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert len(calls) == 2  # not tried again
    with pytest.raises(ValueError, match="failed here before: RuntimeError: gluon says no"):
        st.sage_attention(q, k, v, kernel="hopper")
