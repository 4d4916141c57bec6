"""Attention behind one call, with interchangeable backends.

Every attention in the model goes through `attention(q, k, v, ...)`. Sequence parallelism replaces
the self-attention op of each block with a distributed version of the same signature; attention
backends plug in here.

'sage_triton' is this package's own 8-bit attention (INT8 Q/K, FP8 P/V; wanvideo/modules/sage_triton.py),
for NVIDIA GPUs, with masks; it is never chosen unless asked for, or by 'auto'.

'auto' times sdpa against sage_triton on the first call of each attention shape, on that call's own
inputs with CUDA events, and keeps the faster for that shape (cached in memory, logged once at INFO).
Where sage_triton cannot run (CPU, no triton, head dim other than 128, GPUs before Ampere) it is
sdpa without timing anything. `AutoAttention` takes the timer as an argument, so tests check the
logic on CPU.

Layout everywhere: q [B, Lq, H, Dh], k and v [B, Lk, H, Dh] -> out [B, Lq, H, Dh].
"""
import functools
import importlib.util
import logging
import os
import threading

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash_attn", "sageattention", "sage_triton", "auto")

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
    """Backends usable on this machine: sdpa (the default) first, then the installed optional ones,
    then auto, which is always usable (it falls back to sdpa)."""
    optional = [b for b in BACKENDS if b in _BACKEND_MODULES
                and importlib.util.find_spec(_BACKEND_MODULES[b]) is not None and _missing_device(b) is None]
    return ["sdpa"] + optional + ["auto"]


def check_backend(backend):
    """Raise a clear one-line error for an unknown backend, one whose package is missing, or one
    this machine cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend in _BACKEND_MODULES and importlib.util.find_spec(_BACKEND_MODULES[backend]) is None:
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


def sage_triton_runs_on(q):
    """Whether the sage_triton kernel takes q: a CUDA tensor (a CPU one under Triton's interpreter)
    with head dim 128. Imports triton: call it only where sage_triton was chosen."""
    from . import sage_triton
    runs_here = q.device.type == "cuda" or (q.device.type == "cpu" and sage_triton.INTERPRETED)
    return runs_here and q.shape[-1] == sage_triton.HEAD_DIM


def _sage_triton(q, k, v, key_mask):
    from . import sage_triton  # imports triton: only when this backend runs
    if not sage_triton_runs_on(q):
        if (q.shape[-1], q.device.type) not in _sage_fallbacks:  # e.g. the tiny test models' small heads
            _sage_fallbacks.add((q.shape[-1], q.device.type))
            logger.info("sage_triton handles head dim %d on CUDA; head dim %d on %s uses sdpa.",
                        sage_triton.HEAD_DIM, q.shape[-1], q.device.type)
        return _sdpa(q, k, v, key_mask)
    return sage_triton.sage_attention(q, k, v, key_mask)


_sage_fallbacks = set()


# --- attention_mode 'auto' -------------------------------------------------------------------------

AUTO_TIMED_CALLS = 3        # timed calls of each backend per shape, after one untimed warm-up call
_SAGE_HEAD_DIM = 128        # sage_triton.HEAD_DIM, known here without importing triton
_SAGE_MIN_CAPABILITY = (8, 0)  # the kernel's INT8 and fp16 tensor-core dots; FP8 P/V from 8.9 on


def sage_triton_skip_reason(device_type, head_dim, triton_installed=True, capability=None, rocm=False):
    """Why 'auto' does not time sage_triton for these inputs (a phrase for the log), or None where
    it does. capability: the GPU's (major, minor). GPUs without FP8 tensor cores (Ampere) are timed
    too: the kernel runs there with fp16 P/V, and the timing says whether that is worth it."""
    if device_type != "cuda":
        return f"{device_type} tensors (sage_triton runs on NVIDIA GPUs)"
    if rocm:
        return "a ROCm GPU (sage_triton runs on NVIDIA GPUs)"
    if not triton_installed:
        return "triton is not installed"
    if head_dim != _SAGE_HEAD_DIM:
        return f"head dim {head_dim} (sage_triton takes {_SAGE_HEAD_DIM})"
    if capability is not None and tuple(capability) < _SAGE_MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} (sage_triton needs 8.0 or newer)"
    return None


def _skip_reason_here(q):
    """sage_triton_skip_reason for q on this machine."""
    if q.device.type != "cuda":
        return sage_triton_skip_reason(q.device.type, q.shape[-1])
    return sage_triton_skip_reason("cuda", q.shape[-1], importlib.util.find_spec("triton") is not None,
                                   torch.cuda.get_device_capability(q.device), torch.version.hip is not None)


def cuda_event_time_ms(backend, run, device, calls=AUTO_TIMED_CALLS):
    """Mean milliseconds of run() on `device`'s current stream, measured with CUDA events. One untimed
    call first: it compiles and tunes sage_triton's kernel on its first use and lets SDPA settle on
    its kernel. backend: the name of what runs (an injected timer may use it; this one does not)."""
    with torch.cuda.device(device):
        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls


class AutoAttention:
    """attention_mode 'auto': per attention shape, the faster of sdpa and sage_triton on this GPU.

    The first call of each shape (batch, query tokens, key tokens, heads, head dim, mask or not,
    dtype, device; and whether the log-sum-exp is wanted, as ring attention does) times both on that
    call's own inputs and caches the choice in memory; later calls of the shape only look it up.
    sage_triton is chosen only when it measured strictly faster.

    timer(backend, run, device) -> milliseconds of run(); skip_reason(q) -> why sage_triton is not
    a candidate for q, or None. Both are arguments so that tests check the logic on CPU.
    """

    def __init__(self, timer=cuda_event_time_ms, skip_reason=_skip_reason_here):
        self.timer, self.skip_reason = timer, skip_reason
        self.decisions = {}      # shape key -> 'sdpa' or 'sage_triton'
        self._told = set()       # reasons for not timing, logged once each
        # Decisions are made one at a time: two threads (data_parallel's replicas) meeting the same
        # shape time it once, and no timing runs beside another one on the GPU.
        self._lock = threading.Lock()

    def choose(self, q, k, v, key_mask, runners, with_lse=False):
        """'sdpa' or 'sage_triton' for these inputs. runners: {'sdpa': f, 'sage_triton': f}, each
        f(q, k, v, key_mask), what the caller runs for that choice (timed on the first call of a shape)."""
        key = (with_lse, tuple(q.shape), k.shape[1], key_mask is not None, q.dtype, str(q.device))
        choice = self.decisions.get(key)
        if choice is None:
            with self._lock:
                choice = self.decisions.get(key)
                if choice is None:
                    choice = self.decisions[key] = self._decide(q, k, v, key_mask, runners, with_lse)
        return choice

    def _decide(self, q, k, v, key_mask, runners, with_lse):
        reason = self.skip_reason(q)
        if reason is not None:
            if reason not in self._told:
                self._told.add(reason)
                logger.info("attention 'auto': sdpa, without timing, for %s.", reason)
            return "sdpa"
        times = {"sdpa": self.timer("sdpa", lambda: runners["sdpa"](q, k, v, key_mask), q.device)}
        try:
            times["sage_triton"] = self.timer("sage_triton", lambda: runners["sage_triton"](q, k, v, key_mask),
                                              q.device)
        except Exception as error:  # noqa: BLE001 - a kernel that fails to build or run here: auto is sdpa
            logger.warning("attention 'auto': sage_triton failed on %s (%s: %s); using sdpa for this shape.",
                           q.device, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return "sdpa"
        choice = "sage_triton" if times["sage_triton"] < times["sdpa"] else "sdpa"
        batch, lq, heads, _ = q.shape
        kind = "ring chunk" if with_lse else ("self" if lq == k.shape[1] else "cross")
        logger.info("attention 'auto': %s for %s-attention (batch %d, %d heads, %d x %d tokens%s, %s, %s): "
                    "sdpa %.3f ms, sage_triton %.3f ms.", choice, kind, batch, heads, lq, k.shape[1],
                    ", key mask" if key_mask is not None else "", str(q.dtype).replace("torch.", ""), q.device,
                    times["sdpa"], times["sage_triton"])
        return choice


AUTO = AutoAttention()  # the process's decisions; tests replace it


def auto_choice(q, k, v, key_mask, runners, with_lse=False):
    """AUTO.choose: the backend 'auto' uses for these inputs (see AutoAttention)."""
    return AUTO.choose(q, k, v, key_mask, runners, with_lse)


def _auto(q, k, v, key_mask):
    runners = {name: _IMPLEMENTATIONS[name] for name in ("sdpa", "sage_triton")}
    backend = auto_choice(q, k, v, key_mask, runners)
    return runners[backend](q, k, v, key_mask)


_IMPLEMENTATIONS = {"sdpa": _sdpa, "flash_attn": _flash_attn, "sageattention": _sageattention,
                    "sage_triton": _sage_triton, "auto": _auto}


_UNWRAPPED = {"sage_triton": _sage_triton, "auto": _auto}


def op_backend(op):
    """The backend of an op made by make_attention_op, or None for any other callable (a strategy's op)."""
    if isinstance(op, functools.partial) and op.func is attention:
        return op.keywords.get("backend", "sdpa")
    return None


def attention(q, k, v, key_mask=None, backend="sdpa"):
    """Scaled dot-product attention.

    q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh]; key_mask: optional bool [B, Lk], True where a key is real
    (padding tokens of ragged batches are False). Returns [B, Lq, H, Dh].
    """
    return _IMPLEMENTATIONS[backend](q, k, v, key_mask)


def make_attention_op(backend="sdpa"):
    """The callable that attention modules hold as `attn_op`; checks the backend once."""
    check_backend(backend)
    if backend in ("sage_triton", "auto") and _IMPLEMENTATIONS[backend] is _UNWRAPPED[backend]:
        # torch.compile (per-block compile) leaves the kernel's host code, and auto's timing, alone:
        # they run as is, between graphs. Wrapped here, not at import: torch.compiler.disable imports
        # dynamo (~1 s).
        _IMPLEMENTATIONS[backend] = torch.compiler.disable(_UNWRAPPED[backend])
    return functools.partial(attention, backend=backend)
