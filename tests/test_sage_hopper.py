"""The warp-specialized Hopper kernel behind attention_mode 'sage_triton' (wanvideo/modules/sage_hopper.py).

On any machine: P's column relabelling (the kernel's own RELABEL_SPLIT / RELABEL_ORDER) and the key
order V is stored in agree (the product is unchanged, another order would not be); the kernel
compiles for sm_90a offline with Triton's own ptxas, without spills and without its tensor-core
products serialized; which calls it takes. On a compute capability 9.0 GPU: against exact attention
and the Triton kernel, log-sum-exp included, taken by sage_triton's dispatch exactly where it
applies. The quantization that stores V in that order, and the fallback to the Triton kernel when
this one fails, are checked in the interpreter (test_sage_triton.py).
"""
import os
import re
import subprocess
import tempfile

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from conftest import relative_error as rel  # noqa: E402
from test_sage_triton import exact, make_qkv  # noqa: E402
from wanvideo.modules import sage_hopper as sh  # noqa: E402
from wanvideo.modules import sage_triton as st  # noqa: E402

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
hopper_gpu = pytest.mark.skipif(not ON_HOPPER or st.INTERPRETED, reason="needs a compute capability 9.0 GPU")


def test_relabelled_p_times_v_in_key_order_is_the_product():
    """_to_operand's relabelling of P's columns (here in torch) with V stored in hopper_key_order
    gives P @ V; the order is a permutation within each 16 keys, and V in plain order would not do."""
    n = sh.BLOCK_N
    g = torch.Generator().manual_seed(0)
    p, v = torch.rand(64, n, generator=g, dtype=torch.float64), torch.randn(n, 128, generator=g, dtype=torch.float64)
    order = st.hopper_key_order(n)
    assert sorted(order.tolist()) == list(range(n)) and torch.equal(order // 16, torch.arange(n) // 16)
    p_operand = p.reshape(64, n // 16, *sh.RELABEL_SPLIT.value).permute(*sh.RELABEL_ORDER.value).reshape(64, n)
    v_stored = torch.empty_like(v)
    v_stored[order] = v
    torch.testing.assert_close(p_operand @ v_stored, p @ v)
    assert rel(p_operand @ v, p @ v) > 0.1


def test_row_sum_operand_counts_every_key_of_a_tile_once():
    """P times row_sum_operand's transpose: SUM_PARTS partial sums of equal size adding up to P's row sums."""
    ones = sh.row_sum_operand(torch.device("cpu")).float()
    assert ones.shape == (sh.SUM_PARTS.value, sh.BLOCK_N)
    assert torch.equal(ones.sum(0), torch.ones(sh.BLOCK_N))  # every key in exactly one part
    assert torch.equal(ones.sum(1), torch.full((sh.SUM_PARTS.value, ), sh.BLOCK_N / sh.SUM_PARTS.value))
    p = torch.rand(64, sh.BLOCK_N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close((p @ ones.double().T).sum(1), p.sum(1))


def test_dispatch_rule():
    args = dict(capability=(9, 0), lk=32760, has_mask=False, pv_fp8=True, gluon_available=True)
    assert st.hopper_kernel_applies(**args)
    for change in (dict(capability=(8, 9)), dict(capability=(10, 0)), dict(capability=None), dict(lk=2048),
                   dict(has_mask=True), dict(pv_fp8=False), dict(gluon_available=False)):
        assert not st.hopper_kernel_applies(**dict(args, **change)), change


def test_tail_split_fills_the_last_wave():
    """Items (query blocks x heads) beyond whole waves run split into key ranges where the last wave
    would leave most multiprocessors idle: 12 heads x 32,760 tokens on 132 SMs, 36 items -> 108 parts;
    never more parts than multiprocessors, nor parts of fewer than MIN_PART_TILES tiles."""
    assert sh.tail_split(3072, 132, 256) == (3036, 3)
    assert sh.tail_split(24 * 132, 132, 256) == (24 * 132, 1)      # no tail
    assert sh.tail_split(10240, 132, 256) == (10240, 1)            # 76 items: over half a wave
    assert sh.tail_split(48, 132, 33) == (0, 2)                    # fewer items than SMs: all split
    assert sh.tail_split(3072, 132, 17) == (3036, 2)               # 17 tiles: parts of 8 at least
    assert sh.tail_split(3072, 132, 15) == (3072, 1)
    for items in range(1, 700, 7):
        for tiles in (17, 64, 256):
            whole, splits = sh.tail_split(items, 132, tiles)
            assert (items - whole) * splits <= 132 and tiles // splits >= min(tiles, sh.MIN_PART_TILES)
            assert splits == 1 or (whole % 132 == 0 and 2 <= splits <= sh.MAX_TAIL_SPLITS)


def _ptxas():
    """The ptxas Triton compiles with: its own, or TRITON_PTXAS_PATH's, which torch.compile sets to
    torch's own (newer) ptxas once it has compiled a kernel; Triton writes PTX for that one's version."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception:  # a Triton without the NVIDIA backend's tools
        return None


@pytest.mark.skipif(_ptxas() is None or st.INTERPRETED, reason="this Triton ships no ptxas (or it interprets)")
@pytest.mark.parametrize("return_lse", [False, True])
def test_compiles_for_hopper_without_spills_or_serialized_products(return_lse):
    """Compiled for sm_90a without a GPU (the launch's specialization: 16-byte aligned pointers and
    strides): ptxas reports no spill and no serialized wgmma (it serializes them when registers run
    short or an accumulator is written while a product is in flight, which would forfeit the
    overlap); the partitions get their registers (240 for the consumers, 24 for the producer)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    ops = dict(q=torch.zeros(1, 2, 1024, 128, dtype=torch.int8), k=torch.zeros(1, 2, 1024, 128, dtype=torch.int8),
               v=torch.zeros(1, 2, 128, 1024, dtype=torch.float8_e4m3fn))
    kernel = sh._sage_hopper_kernel
    names = kernel.arg_names
    signature = dict(zip(["q_desc", "ones_desc", "k_desc", "v_desc"], map(mangle_type, sh.descriptors(ops))))
    signature.update({name: "*fp32" for name in ("QS", "KS", "VS", "SHIFT", "LSE", "PART_O", "PART_ML")}, O="*bf16")
    signature.update({name: "i32" for name in ("H", "Lq", "Lk", "LQ_PAD", "L_PAD", "N_QS", "N_KS", "NB", "WHOLE",
                                               "SPLITS", "stride_ob", "stride_ol", "stride_oh")})
    constants = dict(HEAD_DIM=128, QUANT_BLOCK=st.QUANT_BLOCK, K_QUANT_BLOCK=st.K_QUANT_BLOCK, RETURN_LSE=return_lse,
                     P_LOG2_SCALE=st.LOG2_FP8_MAX, BLOCK_N=sh.BLOCK_N, NUM_STAGES=sh.NUM_STAGES,
                     CONSUMER_REGS=sh.CONSUMER_REGS, num_warps=4)
    signature.update({name: "constexpr" for name in constants})
    aligned = ("QS", "KS", "VS", "SHIFT", "O", "LSE", "PART_O", "PART_ML", "LQ_PAD", "L_PAD", "stride_ob", "stride_ol", "stride_oh")
    source = GluonASTSource(fn=kernel, signature={name: signature[name] for name in names},
                            constexprs={(names.index(name),): value for name, value in constants.items()},
                            attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=1, maxnreg=sh.MAXNREG))
    ptx = compiled.asm["ptx"]
    assert {str(sh.CONSUMER_REGS), "24"} <= set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                                capture_output=True, text=True, timeout=300)
    log = report.stdout + report.stderr
    assert report.returncode == 0, log[-3000:]
    assert "0 bytes spill stores" in log, log[-3000:]
    assert not re.search(r"[1-9]\d* bytes spill stores", log), log[-3000:]
    assert "serialized" not in log, log[-3000:]


@pytest.fixture
def hopper_calls(monkeypatch):
    """The number of sage_hopper.attend calls so far (a list of one count), recording while it runs them."""
    calls = [0]
    original = sh.attend

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sh, "attend", counting)
    return calls


@hopper_gpu
@pytest.mark.parametrize("lq,lk", [(300, 2100), (1000, 4100), (129, 2200), (256, 4096), (256, 32760)])
def test_hopper_kernel_against_exact_attention_and_the_triton_kernel(lq, lk, hopper_calls, monkeypatch):
    """sage_triton with the default kernel choice takes the Hopper kernel here (more than 2048 keys,
    no mask; a partial last tile, and a whole one at 4096; 256 tiles at 32760, where row sums kept in
    the tensor cores' FP8 accumulator would lose their small terms): close to exact attention, its
    log-sum-exp too, and to the Triton kernel (the same quantization; P is scaled by the running maximum over 128
    keys here and 64 there, so its FP8 rounding differs a little); bf16 inputs. Unsplit (these few
    query blocks would all be split: test_tail_items_split_into_key_ranges)."""
    monkeypatch.setattr(sh, "MAX_TAIL_SPLITS", 1)
    q, k, v = (t.cuda() for t in make_qkv(lq, lk))
    out, lse = st.sage_attention(q, k, v, return_lse=True)
    assert hopper_calls[0] == 1
    want, want_lse = exact(q, k, v)
    assert rel(out, want) <= 5e-2
    assert (lse - want_lse).abs().max() <= 3e-2
    triton_out, triton_lse = st.sage_attention(q, k, v, return_lse=True, kernel="triton")
    assert hopper_calls[0] == 1
    assert rel(out, triton_out) <= 2e-2
    assert (lse - triton_lse).abs().max() <= 1e-2
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q, k, v))
    out16 = st.sage_attention(q16, k16, v16, kernel="hopper")
    assert hopper_calls[0] == 2 and out16.dtype == torch.bfloat16
    assert rel(out16, want) <= 5e-2


@hopper_gpu
@pytest.mark.parametrize("sms,plan", [(31, (31, 4)), (64, (0, 2))], ids=["one", "every"])
def test_tail_items_split_into_key_ranges(sms, plan):
    """The kernel with its tail split (tail_split for a pretend count of multiprocessors: the last of
    32 items split in 4, every item in 2): the split items' rows as close to exact attention as
    unsplit, log-sum-exp included; the other rows unchanged. Not equal to unsplit: each part scales P
    by its own maximum, so P's FP8 rounding (about 2.5% of the output alone) falls otherwise there."""
    q, k, v = (t.cuda() for t in make_qkv(1000, 4100))
    ops = st.quantize(q, k, v, with_shift=True, permute_keys=True)
    blocks = 8                                 # query blocks a (batch, head): 32 items for batch 2 x 2 heads
    assert sh.tail_split(blocks * 2 * 2, sms, 33) == plan
    (out, lse), (plain, plain_lse) = [(torch.empty_like(q), torch.empty(2, 2, 1000, device="cuda")) for _ in range(2)]
    sh.attend(ops, out, lse, 4100, sms=sms)
    sh.attend(ops, plain, plain_lse, 4100, sms=blocks * 2 * 2 + 1)   # one wave over half full: no split
    split = torch.zeros(2, 2, 1000, dtype=torch.bool, device="cuda")  # [B, H, Lq]: the rows of split items
    for item in range(plan[0], blocks * 2 * 2):
        bh, block = divmod(item, blocks)
        split[bh // 2, bh % 2, block * sh.BLOCK_M:(block + 1) * sh.BLOCK_M] = True
    want, want_lse = exact(q, k, v)
    rows = lambda t: t.permute(0, 2, 1, 3)[split]  # noqa: E731  [B, Lq, H, D] -> the split rows [n, D]
    assert rel(rows(out), rows(want)) <= min(5e-2, 1.1 * rel(rows(plain), rows(want)))
    assert 0 < rel(rows(out), rows(plain)) <= 5e-2
    assert torch.equal(out.permute(0, 2, 1, 3)[~split], plain.permute(0, 2, 1, 3)[~split])
    assert (lse - want_lse).abs().max() <= 3e-2 and (lse - plain_lse).abs().max() <= 1e-2


@hopper_gpu
def test_an_all_zero_query_block_averages_the_real_keys(hopper_calls):
    """Queries of zero (a whole INT8 block: its scale is ~1e-32) weigh every key alike: the output is
    V's mean over the real keys; the padding keys of the partial last tile take no part."""
    q, k, v = (t.cuda() for t in make_qkv(130, 2100))
    q[:, :64] = 0
    out, lse = st.sage_attention(q, k, v, return_lse=True)
    assert hopper_calls[0] == 1
    want, want_lse = exact(q, k, v)
    assert rel(out[:, :64], v.mean(dim=1, keepdim=True).expand(-1, 64, -1, -1)) <= 3e-2
    assert (lse[..., :64] - want_lse[..., :64]).abs().max() <= 3e-2
    assert rel(out, want) <= 5e-2


@hopper_gpu
def test_masked_and_short_calls_stay_on_the_triton_kernel(hopper_calls):
    """A key mask (ragged batches) or 2048 keys and fewer (cross-attention) keep the Triton kernel
    (ring chunks carry no mask: their long ones take the Hopper kernel, with the log-sum-exp);
    asking for the Hopper kernel there is refused with the reason."""
    q, k, v = (t.cuda() for t in make_qkv(200, 3000))
    mask = torch.ones(2, 3000, dtype=torch.bool, device="cuda")
    mask[1, 2000:] = False
    assert rel(st.sage_attention(q, k, v, key_mask=mask), exact(q, k, v, mask)[0]) <= 5e-2
    assert rel(st.sage_attention(q, k[:, :512], v[:, :512]), exact(q, k[:, :512], v[:, :512])[0]) <= 5e-2
    assert hopper_calls[0] == 0
    with pytest.raises(ValueError, match="no key mask"):
        st.sage_attention(q, k, v, key_mask=mask, kernel="hopper")
    with pytest.raises(ValueError, match="kernel must be one of"):
        st.sage_attention(q, k, v, kernel="cuda")
