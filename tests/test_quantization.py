"""fp8 storage error, the fp8 matmul fast path (its math on CPU, its fallback), and per-block torch.compile."""
import copy
import functools
import logging

import pytest
import torch
import torch.nn as nn

from conftest import relative_error
from wanvideo import load_wan_model
from wanvideo.engine import compile_blocks, fp8_fast, is_block_compiled, uncompile_blocks
from wanvideo.engine.fp8_fast import (fp8_fast_active, fp8_fast_supported, fp8_scaled_linear, quantize_input_fp8,
                                      set_fp8_fast)
from wanvideo.quantization import FP8_DTYPES, QUANTIZATION_MODES, FP8Linear, quantize_weight

E4M3 = torch.float8_e4m3fn
E4M3_EPS = torch.finfo(E4M3).eps  # 2^-3: e4m3 keeps 3 mantissa bits
E4M3_TINY = 2.0 ** -9             # smallest e4m3 subnormal


def forward_once(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model([torch.randn(16, 3, 4, 6, generator=g)], torch.tensor([700.0]),
                     [torch.randn(5, 32, generator=g)])[0]


def fp8_linear(in_features, out_features, seed=0, fp8_dtype=E4M3):
    g = torch.Generator().manual_seed(seed)
    layer = FP8Linear(in_features, out_features)
    weight, scale = quantize_weight(torch.randn(out_features, in_features, generator=g) / in_features ** 0.5, fp8_dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.scale_weight.copy_(scale)
    layer.bias.data.copy_(0.1 * torch.randn(out_features, generator=g))
    return layer.requires_grad_(False)


# --- fp8 storage ---------------------------------------------------------------------------------

def test_fast_mode_is_a_quantization_mode_that_loads_e4m3_storage(tiny_checkpoints):
    assert "fp8_e4m3fn_fast" in QUANTIZATION_MODES and FP8_DTYPES["fp8_e4m3fn_fast"] == E4M3
    path = tiny_checkpoints["t2v"][0]
    fast = load_wan_model(path, base_precision="fp32", quantization="fp8_e4m3fn_fast")
    plain = load_wan_model(path, base_precision="fp32", quantization="fp8_e4m3fn")
    assert fast.blocks[0].self_attn.q.weight.dtype == E4M3
    assert torch.equal(forward_once(fast), forward_once(plain))  # on CPU both take the upcast path


def test_fp8_storage_error_against_fp32(tiny_checkpoints):
    path = tiny_checkpoints["t2v"][0]
    reference = forward_once(load_wan_model(path, base_precision="fp32"))
    errors = {mode: relative_error(forward_once(load_wan_model(path, base_precision="fp32", quantization=mode)),
                                   reference) for mode in ("fp8_e4m3fn", "fp8_e5m2")}
    print(f"relative L2 error of the tiny model output vs fp32: {errors}")
    assert 0 < errors["fp8_e4m3fn"] < errors["fp8_e5m2"] < 0.1  # e5m2 keeps one mantissa bit fewer


def test_emulated_fast_path_error_against_fp32(tiny_checkpoints, monkeypatch):
    """The whole tiny model with every fp8 layer through fp8_scaled_linear (torch._scaled_mm on CPU)."""
    path = tiny_checkpoints["t2v"][0]
    reference = forward_once(load_wan_model(path, base_precision="fp32"))
    storage_only = forward_once(load_wan_model(path, base_precision="fp32", quantization="fp8_e4m3fn"))
    monkeypatch.setattr(FP8Linear, "forward", lambda self, x: fp8_scaled_linear(
        x, self.weight, self.scale_weight, self.bias, "row"))
    errors = {}
    for precision in ("fp32", "bf16"):  # fp32 inputs take one scale per tensor, bf16 inputs one per row
        model = load_wan_model(path, base_precision=precision, quantization="fp8_e4m3fn_fast")
        errors[precision] = relative_error(forward_once(model), reference)
    print(f"relative L2 error of the fast path vs fp32: {errors}; fp8 storage alone: "
          f"{relative_error(storage_only, reference):.4f}")
    assert relative_error(storage_only, reference) < errors["fp32"] < 0.1  # inputs rounded too: a bit more
    assert 0 < errors["bf16"] < 0.1


# --- fast path math, on CPU ----------------------------------------------------------------------

@pytest.mark.parametrize("per_row", [True, False])
def test_input_quantization_round_trip(per_row):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=g) * torch.logspace(-3, 2, 37)[:, None]  # rows of very different size
    x_fp8, scale = quantize_input_fp8(x.to(torch.bfloat16), per_row)
    x = x.to(torch.bfloat16).float()
    assert x_fp8.dtype == E4M3 and scale.dtype == torch.float32
    assert scale.shape == ((37, 1) if per_row else (1, 1))
    amax = x.abs().amax(dim=1, keepdim=True) if per_row else x.abs().amax()
    assert torch.allclose(scale * 448, amax.expand_as(scale), rtol=1e-6)  # the largest |x| lands on 448
    dequantized = x_fp8.float() * scale
    # within half an ulp of e4m3 (relative) or half the smallest subnormal step (absolute)
    bound = torch.maximum(x.abs() * E4M3_EPS / 2, scale * E4M3_TINY / 2) * (1 + 1e-6)
    assert ((dequantized - x).abs() <= bound).all()
    if per_row:  # per-row scales keep small rows accurate; one scale for all would flush them to zero
        assert relative_error(dequantized[:5], x[:5]) < E4M3_EPS / 2


@pytest.mark.parametrize("dtype, scaling", [(torch.bfloat16, "row"), (torch.bfloat16, "tensor"),
                                            (torch.float16, "row"), (torch.float32, "tensor")])
def test_scaled_linear_matches_float_math(dtype, scaling):
    """fp8_scaled_linear through torch._scaled_mm (CPU kernel) against the same fp8 operands in float64."""
    layer = fp8_linear(64, 48, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 64, generator=g).to(dtype)
    out = fp8_scaled_linear(x, layer.weight, layer.scale_weight, layer.bias, scaling)
    assert out.shape == (2, 9, 48) and out.dtype == dtype

    per_row = scaling == "row" and dtype == torch.bfloat16  # row-wise scales need a bf16 output
    x_fp8, x_scale = quantize_input_fp8(x.reshape(-1, 64), per_row)
    operands = (x_fp8.double() * x_scale.double()) @ (layer.weight.double() * layer.scale_weight.double()).T
    expected = (operands + layer.bias.double()).reshape(2, 9, 48)
    output_rounding = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 1e-6}[dtype]
    assert relative_error(out, expected) <= output_rounding
    exact = x.double() @ layer.dequantized_weight(torch.float64).T + layer.bias.double()
    assert 0 < relative_error(out, exact) < E4M3_EPS / 2  # only the input rounding separates it from exact


# --- fallback ------------------------------------------------------------------------------------

def test_fast_supported_says_why_not():
    ok, reason = fp8_fast_supported("cpu")
    assert not ok and "cpu" in reason and "not a CUDA GPU" in reason
    if not torch.cuda.is_available():
        ok, reason = fp8_fast_supported("cuda")
        assert not ok and "CUDA is not available" in reason


def test_fallback_on_cpu_keeps_upcast_result_and_logs_once(tiny_checkpoints, caplog):
    model = load_wan_model(tiny_checkpoints["t2v"][0], base_precision="fp32", quantization="fp8_e4m3fn_fast")
    before = forward_once(model)
    with caplog.at_level(logging.INFO, logger="wanvideo.engine.fp8_fast"):
        assert set_fp8_fast(model, True) is False
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "upcast" in record.getMessage() and "cpu" in record.getMessage()
    assert not fp8_fast_active(model)
    assert torch.equal(forward_once(model), before)


def test_fast_flag_needs_a_cuda_weight():
    """A layer flagged fast whose weight sits on the CPU (e.g. swapped out) computes on the upcast path."""
    layer = fp8_linear(32, 16, seed=3)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    upcast = layer(x)
    layer.fast_linear = functools.partial(fp8_scaled_linear, input_scaling="row")
    assert torch.equal(layer(x), upcast)
    expected = x.float() @ layer.dequantized_weight(torch.float32).T + layer.bias
    assert relative_error(upcast, expected) < 2 ** -7


def test_set_fp8_fast_rules_when_the_device_is_capable(monkeypatch, caplog):
    """With a capable device pretended, the flags follow the weight dtype and the 16-alignment rule."""
    monkeypatch.setattr(fp8_fast, "fp8_fast_supported", lambda device: (True, ""))
    monkeypatch.setattr(fp8_fast, "_probe_scaled_mm", lambda device, scaling: scaling == "tensor")
    model = nn.Sequential(fp8_linear(32, 48), fp8_linear(24, 32), nn.Linear(8, 8))
    with caplog.at_level(logging.INFO, logger="wanvideo.engine.fp8_fast"):
        assert set_fp8_fast(model, True, device="cpu") is True
    assert model[0].fp8_fast and not model[1].fp8_fast  # 24 is not a multiple of 16
    assert model[0].fast_linear.keywords["input_scaling"] == "tensor"  # no row-wise kernel: one scale per tensor
    assert any("row-wise" in r.getMessage() for r in caplog.records)
    assert set_fp8_fast(model, False) is False and not fp8_fast_active(model)

    e5m2 = nn.Sequential(fp8_linear(32, 48, fp8_dtype=torch.float8_e5m2))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wanvideo.engine.fp8_fast"):
        assert set_fp8_fast(e5m2, True, device="cpu") is False
    [record] = caplog.records
    assert "float8_e5m2" in record.getMessage() and not fp8_fast_active(e5m2)
    with pytest.raises(ValueError, match="'col'"):
        set_fp8_fast(model, True, input_scaling="col")


def test_set_fp8_fast_without_fp8_layers(tiny_checkpoints, caplog):
    model = load_wan_model(tiny_checkpoints["t2v"][0], base_precision="fp32")
    with caplog.at_level(logging.WARNING, logger="wanvideo.engine.fp8_fast"):
        assert set_fp8_fast(model, True) is False
    assert "no fp8 layers" in caplog.records[0].getMessage()


# --- torch.compile per block -----------------------------------------------------------------------

def swap_in_hooks(model, factor):
    """Block-swap-like pre-hooks: replace every parameter's storage (param.data) right before the block runs."""
    def swap(block, args):
        for param in block.parameters():
            param.data = param.data * factor
    return [block.register_forward_pre_hook(swap) for block in model.blocks]


def test_compile_is_off_by_default_and_keeps_outputs(tiny_checkpoints):
    torch._dynamo.reset()
    model = load_wan_model(tiny_checkpoints["t2v"][0], base_precision="fp32")
    assert not any(is_block_compiled(block) for block in model.blocks)
    eager = copy.deepcopy(model)
    # aot_eager traces each block through dynamo and AOTAutograd like inductor does, minus the C++ build
    # (inductor itself gave a relative error of 2e-7 here but takes ~20 s to build on this CPU)
    compile_blocks(model, backend="aot_eager")
    assert all(is_block_compiled(block) for block in model.blocks)
    assert relative_error(forward_once(model), forward_once(eager)) <= 1e-5

    for m in (model, eager):  # weights moved by hooks between calls are the ones the compiled code uses
        swap_in_hooks(m, 1.01)
    first = forward_once(model)
    assert relative_error(first, forward_once(eager)) <= 1e-5
    assert relative_error(forward_once(model), first) > 1e-4  # the hooks did change the weights again

    replica = copy.deepcopy(model)  # a copy computes with its own weights, not the original's
    for param in replica.blocks.parameters():
        param.data.zero_()
    assert relative_error(forward_once(replica), forward_once(model)) > 1e-3
    uncompile_blocks(model)
    assert not any(is_block_compiled(block) for block in model.blocks)
    with pytest.raises(ValueError, match="'fast'"):
        compile_blocks(model, mode="fast")
