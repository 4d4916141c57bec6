"""Attention behind one call, with interchangeable backends.

Every attention in the model goes through `attention(q, k, v, ...)`. Sequence parallelism replaces
the self-attention op of each block with a distributed version of the same signature; attention
backends plug in here.

Layout everywhere: q [B, Lq, H, Dh], k and v [B, Lk, H, Dh] -> out [B, Lq, H, Dh].
"""
import functools
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash_attn", "sageattention")

# Which pip package provides each optional backend, for error messages.
_BACKEND_PACKAGES = {"flash_attn": "flash-attn", "sageattention": "sageattention"}


def available_backends():
    """Backends usable on this machine; sdpa is always there."""
    return ["sdpa"] + [b for b in BACKENDS[1:] if importlib.util.find_spec(b) is not None]


def check_backend(backend):
    """Raise a clear error for an unknown backend or one whose package is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend != "sdpa" and importlib.util.find_spec(backend) is None:
        raise ImportError(
            f"Attention backend {backend!r} needs the package {_BACKEND_PACKAGES[backend]!r}, which is not "
            f"installed. Install it (pip install {_BACKEND_PACKAGES[backend]}) or choose 'sdpa'.")


def _sdpa(q, k, v, key_mask):
    mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, Lk], True = attend
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _flash_attn(q, k, v, key_mask):
    import flash_attn
    if key_mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
        return _sdpa(q, k, v, key_mask)  # flash-attn has no dense masks and needs half precision
    return flash_attn.flash_attn_func(q, k, v)


def _sageattention(q, k, v, key_mask):
    import sageattention
    if key_mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
        return _sdpa(q, k, v, key_mask)
    return sageattention.sageattn(q, k, v, tensor_layout="NHD")


_IMPLEMENTATIONS = {"sdpa": _sdpa, "flash_attn": _flash_attn, "sageattention": _sageattention}


def attention(q, k, v, key_mask=None, backend="sdpa"):
    """Scaled dot-product attention.

    q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh]; key_mask: optional bool [B, Lk], True where a key is real
    (padding tokens of ragged batches are False). Returns [B, Lq, H, Dh].
    """
    return _IMPLEMENTATIONS[backend](q, k, v, key_mask)


def make_attention_op(backend="sdpa"):
    """The callable that attention modules hold as `attn_op`; checks the backend once."""
    check_backend(backend)
    return functools.partial(attention, backend=backend)
