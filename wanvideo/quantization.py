"""fp8 storage of the large Linear weights, upcast per layer at compute.

Only the Linear layers inside the transformer blocks are stored in fp8 (they are ~97% of the
weights); norms, biases, embeddings, modulation and the head stay in the base precision.
"""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
QUANTIZATION_MODES = ("disabled",) + tuple(FP8_DTYPES)


class FP8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 with a per-tensor scale: W = weight * scale_weight.

    Same parameter names as nn.Linear (`weight`, `bias`), so checkpoints, LoRA merging and block
    swap treat it like any Linear; `scale_weight` is the per-tensor scale that ComfyUI's scaled fp8
    checkpoints store under the same name.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("scale_weight", torch.ones((), device=device, dtype=torch.float32))

    def dequantized_weight(self, dtype):
        return self.weight.to(dtype) * self.scale_weight.to(dtype)

    def forward(self, x):
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
