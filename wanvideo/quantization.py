"""fp8 storage of the large Linear weights, upcast per layer at compute.

Only the Linear layers inside the transformer blocks are stored in fp8 (they are ~97% of the
weights); norms, biases, embeddings, modulation and the head stay in the base precision.

Two ways to compute with an fp8 weight:
  - upcast (here, any device): the weight is dequantized to the input dtype and F.linear runs
    in bf16/fp16/fp32. Saves memory, not time.
  - fast (`fp8_e4m3fn_fast`, CUDA compute capability >= 8.9): the single-GPU engine
    (wanvideo/engine/fp8_fast.py) installs an fp8 matmul on each layer once the model is placed;
    this file only keeps the seam for it (`FP8Linear.fast_linear`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2}
FAST_MODES = ("fp8_e4m3fn_fast",)  # load like their storage dtype, then `set_fp8_fast(model, True)`
QUANTIZATION_MODES = ("disabled",) + tuple(FP8_DTYPES)


class FP8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 with a per-tensor scale: W = weight * scale_weight.

    Same parameter names as nn.Linear (`weight`, `bias`), so checkpoints, LoRA merging and block
    swap treat it like any Linear; `scale_weight` is the per-tensor scale that ComfyUI's scaled fp8
    checkpoints store under the same name.

    `fast_linear` (installed by wanvideo.engine.set_fp8_fast, not saved in the state dict) is an
    fp8 matmul `fast_linear(x, weight, scale_weight, bias)` that CUDA calls take instead of the upcast.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("scale_weight", torch.ones((), device=device, dtype=torch.float32))
        self.fast_linear = None

    @property
    def fp8_fast(self):
        """Whether the engine's fp8 matmul is installed on this layer."""
        return self.fast_linear is not None

    def dequantized_weight(self, dtype):
        return self.weight.to(dtype) * self.scale_weight.to(dtype)

    def forward(self, x):
        # the weight may sit on the CPU between uses under block swap: only a CUDA weight takes the fast path
        if self.fast_linear is not None and self.weight.is_cuda:
            return self.fast_linear(x, self.weight, self.scale_weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def quantizable_linear_names(model):
    """Names of the Linear modules stored in fp8 under quantization: those inside the blocks."""
    return [f"blocks.{i}.{name}" for i, block in enumerate(model.blocks)
            for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def replace_linears_with_fp8(model):
    """Swap the block Linears for FP8Linear shells (on the meta device, before loading)."""
    for full_name in quantizable_linear_names(model):
        parent_name, _, child = full_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = FP8Linear(old.in_features, old.out_features, old.bias is not None, device=old.weight.device)
        setattr(parent, child, new)
    return model


def quantize_weight(weight, fp8_dtype):
    """High-precision weight -> (fp8 weight, float32 per-tensor scale) with max-abs scaling."""
    weight = weight.float()
    max_representable = torch.finfo(fp8_dtype).max
    scale = weight.abs().max().clamp(min=1e-12) / max_representable
    return (weight / scale).clamp(-max_representable, max_representable).to(fp8_dtype), scale
