"""The fp8 matmul fast path: activations quantized on the fly, fp8 x fp8 products on tensor cores.

For `fp8_e4m3fn_fast` on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper): the input is
quantized to float8_e4m3fn (per-row or per-tensor scale) and `torch._scaled_mm` multiplies the two
fp8 operands, output in the input dtype. Faster than the upcast path of wanvideo.quantization,
with a little more error (the activations are rounded to 3 mantissa bits too). The pipeline turns
it on once the model is placed (`enable_fp8_fast`), since a model loaded to the CPU for block swap
only learns its compute device then.
"""
import functools
import logging

import torch

from ..modules.lazy_compile import LazyCompile
from ..quantization import FP8Linear, quantize_weight

logger = logging.getLogger(__name__)

INPUT_SCALINGS = ("row", "tensor")
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
MIN_FAST_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have fp8 tensor cores
SCALED_MM_ALIGNMENT = 16  # _scaled_mm needs the inner and output dims to be multiples of 16



def quantize_input_fp8(x2d, per_row):
    """Activations [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1] if per_row else [1, 1]).

    Max-abs scaling: x ~= x_fp8.float() * scale, the largest |x| of each row (or of the tensor)
    landing on 448. Pure tensor math, no host sync, so it runs (and is tested) on any device.
    """
    # few passes over x when eager: max |x| in one reduction, then divide (in float32 by type
    # promotion), saturate in place and cast; out-of-range values would turn into NaN in e4m3fn
    amax = torch.linalg.vector_norm(x2d, float("inf"), dim=1 if per_row else None, keepdim=True,
                                    dtype=torch.float32)
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    scaled = x2d / scale
    return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_scaled_linear(x, weight, scale_weight, bias, input_scaling="row"):
    """y = x @ (weight * scale_weight).T + bias through torch._scaled_mm with an fp8-quantized input.

    x: [..., K] bf16/fp16/fp32; weight: [N, K] float8_e4m3fn (row-major, so weight.t() is the
    column-major [K, N] operand _scaled_mm wants); scale_weight: float32 scalar; bias: [N] or None.
    K and N must be multiples of 16. Returns [..., N] in x.dtype. Row-wise scales need a bf16
    output (a cuBLAS limit), so other dtypes use one scale for the whole input.
    """
    leading, in_features = x.shape[:-1], x.shape[-1]
    per_row = input_scaling == "row" and x.dtype == torch.bfloat16
    x_fp8, x_scale = _quantize_input(x.reshape(-1, in_features), per_row)
    w_scale = scale_weight.float().reshape(1, 1)
    if per_row:  # row-wise scaling takes a [1, N] weight scale alongside the [M, 1] input scale
        w_scale = w_scale.expand(1, weight.shape[0]).contiguous()
    bias = None if bias is None else bias.to(x.dtype)
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=x.dtype)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    return out.reshape(*leading, weight.shape[0])


_fused_quantize = LazyCompile(quantize_input_fp8, "the fp8 input quantization (eagerly, the fp8 fast path may be "
                              "slower than the upcast path)", dynamic=True)


def _quantize_input(x2d, per_row):
    """quantize_input_fp8, fused by torch.compile into one reduction and one pointwise kernel on CUDA.

    Eager, its extra passes over the activations cost more than the fp8 matmul saves (H100, a
    [8192, 5120] x [5120, 5120] layer: 1.10 ms against 0.69 ms for the upcast path). Inside an
    outer torch.compile (compile_blocks) it is traced as part of the block instead. LazyCompile
    makes the first compile safe from data_parallel's threads and gives it up only when compiling
    cannot work here; a transient error (out of memory) propagates.
    """
    return _fused_quantize(x2d, per_row)


def fp8_fast_supported(device):
    """(supported, reason): can `device` run the fp8 matmul fast path? reason is '' when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"device {device} is not a CUDA GPU"
    if not torch.cuda.is_available():
        return False, "CUDA is not available in this PyTorch build or machine"
    if getattr(torch.version, "hip", None):
        return False, "ROCm GPUs use other fp8 formats (e4m3fnuz); the fast path supports NVIDIA GPUs only"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm; upgrade to torch >= 2.4"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_FAST_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return False, (f"{name} has compute capability {capability[0]}.{capability[1]}; fp8 matmul needs "
                       f"{MIN_FAST_CAPABILITY[0]}.{MIN_FAST_CAPABILITY[1]} or newer (RTX 40xx, L4/L40, H100)")
    return True, ""


def _probe_scaled_mm(device, input_scaling):
    """Whether this torch/device pair runs _scaled_mm with this input scaling (row-wise kernels are newer:
    torch 2.11's CPU kernel, for one, takes per-tensor scales only). The tests ask it too."""
    try:
        x = torch.randn(16, 32, device=device, dtype=torch.bfloat16)
        weight, scale = quantize_weight(torch.randn(16, 32, device=device), torch.float8_e4m3fn)
        fp8_scaled_linear(x, weight, scale, torch.zeros(16, device=device), input_scaling)
        return True
    except Exception as error:  # any error (RuntimeError, ValueError, ...) means this pair cannot
        logger.debug("_scaled_mm with %s-wise input scales failed on %s: %s", input_scaling, device, error)
        return False


def _compute_device(model):
    """Where the model computes: its first CUDA parameter (blocks may sit on the CPU under block swap)."""
    devices = [p.device for p in model.parameters()]
    return next((d for d in devices if d.type == "cuda"), devices[0] if devices else torch.device("cpu"))


def set_fp8_fast(model, enabled, device=None, input_scaling="row"):
    """Turn the fp8 matmul fast path of every FP8Linear on or off. Returns whether it is active.

    device: the GPU the model computes on (default: its first CUDA parameter's device).
    input_scaling: 'row' (one scale per token, more accurate) or 'tensor'; falls back to 'tensor'
    when this torch/GPU has no row-wise kernel. Where the fast path cannot run (CPU, GPUs before
    compute capability 8.9, float8_e5m2 weights) the layers keep the upcast path and one log
    message says why. Layers whose dims are not multiples of 16 keep the upcast path.
    """
    if input_scaling not in INPUT_SCALINGS:
        raise ValueError(f"input_scaling {input_scaling!r} is not one of {', '.join(INPUT_SCALINGS)}.")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.fast_linear = None
    if not enabled:
        return False
    if not layers:
        logger.warning("fp8 fast matmul not enabled: the model has no fp8 layers (load it with quantization "
                       "'fp8_e4m3fn_fast').")
        return False
    device = torch.device(device) if device is not None else _compute_device(model)
    supported, reason = fp8_fast_supported(device)
    if supported and any(layer.weight.dtype != torch.float8_e4m3fn for layer in layers):
        dtype = next(layer.weight.dtype for layer in layers if layer.weight.dtype != torch.float8_e4m3fn)
        supported, reason = False, f"the weights are {str(dtype).replace('torch.', '')}; the fast path needs float8_e4m3fn"
    if supported and input_scaling == "row" and not _probe_scaled_mm(device, "row"):
        input_scaling = "tensor"
        logger.info("This torch/GPU has no row-wise scaled fp8 matmul; using one input scale per tensor.")
    if supported and not _probe_scaled_mm(device, input_scaling):
        supported, reason = False, f"torch._scaled_mm failed on {device} (torch {torch.__version__})"
    if not supported:
        logger.warning("fp8 fast matmul not available, using the fp8 upcast path: %s.", reason)
        return False
    aligned = [layer for layer in layers if layer.in_features % SCALED_MM_ALIGNMENT == 0
               and layer.out_features % SCALED_MM_ALIGNMENT == 0]
    for layer in aligned:
        layer.fast_linear = functools.partial(fp8_scaled_linear, input_scaling=input_scaling)
    if len(aligned) < len(layers):
        logger.info("%d of %d fp8 layers have dims that are not multiples of %d and keep the upcast path.",
                    len(layers) - len(aligned), len(layers), SCALED_MM_ALIGNMENT)
    logger.info("fp8 fast matmul on %s for %d layers (%s-wise input scales).", device, len(aligned), input_scaling)
    return bool(aligned)


def enable_fp8_fast(model, devices):
    """set_fp8_fast for a model computing on `devices`: on only if every CUDA device among them can
    (mixed GPUs: an older card turns it off, with the reason). Returns whether it is active."""
    devices = [torch.device(d) for d in devices]
    cuda = [d for d in devices if d.type == "cuda"]
    if not cuda:
        return set_fp8_fast(model, True, devices[0])  # logs why not
    unsupported = next((d for d in cuda if not fp8_fast_supported(d)[0]), None)
    return set_fp8_fast(model, True, unsupported or cuda[0])


def fp8_fast_active(model):
    """Whether any FP8Linear of the model has the fast path on."""
    return any(m.fp8_fast for m in model.modules() if isinstance(m, FP8Linear))
