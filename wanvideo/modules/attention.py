"""Attention behind one call, with interchangeable backends.

Every attention in the model goes through `attention(q, k, v, ...)`. Sequence parallelism replaces
the self-attention op of each block with a distributed version of the same signature; attention
backends plug in here.

'sage_triton' is this package's own 8-bit attention (INT8 Q/K, FP8 P/V; wanvideo/modules/sage_triton.py),
for NVIDIA GPUs, with masks; it is never chosen unless asked for.

Layout everywhere: q [B, Lq, H, Dh], k and v [B, Lk, H, Dh] -> out [B, Lq, H, Dh].
"""
import functools
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash_attn", "sageattention", "sage_triton")

# Which pip package provides each optional backend, and the module it installs, for error messages.
_BACKEND_PACKAGES = {"flash_attn": "flash-attn", "sageattention": "sageattention", "sage_triton": "triton"}
_BACKEND_MODULES = {"flash_attn": "flash_attn", "sageattention": "sageattention", "sage_triton": "triton"}


def _missing_device(backend):
    """Why `backend` cannot run on this machine's devices (one sentence), or None. Only sage_triton
    has a device need: an NVIDIA GPU (Triton's CPU interpreter, TRITON_INTERPRET=1, stands in for tests)."""
    if backend != "sage_triton" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return ("Attention mode 'sage_triton' runs on NVIDIA GPUs (CUDA) only and this machine has none; "
                "choose 'sdpa' instead.")
    return None


def available_backends():
    """Backends usable on this machine; sdpa is always there."""
    return ["sdpa"] + [b for b in BACKENDS[1:]
                       if importlib.util.find_spec(_BACKEND_MODULES[b]) is not None and _missing_device(b) is None]


def check_backend(backend):
    """Raise a clear one-line error for an unknown backend, one whose package is missing, or one
    this machine cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend != "sdpa" and importlib.util.find_spec(_BACKEND_MODULES[backend]) is None:
        raise ImportError(
            f"Attention backend {backend!r} needs the package {_BACKEND_PACKAGES[backend]!r}, which is not "
            f"installed. Install it (pip install {_BACKEND_PACKAGES[backend]}) or choose 'sdpa'.")
    problem = _missing_device(backend)
    if problem is not None:
        raise ValueError(problem)


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


def _sage_triton(q, k, v, key_mask):
    from . import sage_triton  # imports triton: only when this backend runs
    runs_here = q.device.type == "cuda" or (q.device.type == "cpu" and sage_triton.INTERPRETED)
    if q.shape[-1] != sage_triton.HEAD_DIM or not runs_here:
        if (q.shape[-1], q.device.type) not in _sage_fallbacks:  # e.g. the tiny test models' small heads
            _sage_fallbacks.add((q.shape[-1], q.device.type))
            logger.info("sage_triton handles head dim %d on CUDA; head dim %d on %s uses sdpa.",
                        sage_triton.HEAD_DIM, q.shape[-1], q.device.type)
        return _sdpa(q, k, v, key_mask)
    return sage_triton.sage_attention(q, k, v, key_mask)


_sage_fallbacks = set()

_IMPLEMENTATIONS = {"sdpa": _sdpa, "flash_attn": _flash_attn, "sageattention": _sageattention,
                    "sage_triton": _sage_triton}


def attention(q, k, v, key_mask=None, backend="sdpa"):
    """Scaled dot-product attention.

    q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh]; key_mask: optional bool [B, Lk], True where a key is real
    (padding tokens of ragged batches are False). Returns [B, Lq, H, Dh].
    """
    return _IMPLEMENTATIONS[backend](q, k, v, key_mask)


def make_attention_op(backend="sdpa"):
    """The callable that attention modules hold as `attn_op`; checks the backend once."""
    check_backend(backend)
    if backend == "sage_triton" and _IMPLEMENTATIONS["sage_triton"] is _sage_triton:
        # torch.compile (per-block compile) leaves the kernel's host code alone: it runs as is,
        # between graphs. Wrapped here, not at import: torch.compiler.disable imports dynamo (~1 s).
        _IMPLEMENTATIONS["sage_triton"] = torch.compiler.disable(_sage_triton)
    return functools.partial(attention, backend=backend)
