"""torch.compile for the package's small fused functions: compiled at first use, safe to call from
several threads at once, and given up for the process only when compiling cannot work here.

Used by the fused kernels of the model (`_FusedOnCuda`) and the fp8 input quantizer
(wanvideo/engine/fp8_fast.py); per-block compile (wanvideo/engine/compile.py) takes the same lock.
"""
import logging
import threading

import torch

logger = logging.getLogger(__name__)

# While torch.compile traces a function it sets process-wide state (FX's tracing flag), and another
# thread that enters any compiled function meanwhile fails with "Detected that you are using FX to
# symbolically trace a dynamo-optimized function" (torch 2.11, data_parallel's replica threads at their
# first forward). So every call of a compiled function of the package holds this lock: a compile never
# overlaps another compiled call. Calls only launch kernels, which the GIL mostly serialises anyway.
# Reentrant: a compiled block whose graph breaks may call a fused function eagerly inside.
COMPILE_LOCK = threading.RLock()


def cannot_compile(error):
    """Whether `error`, raised by a compiled call, means compiling cannot work here (no Triton, a GPU or
    platform the compiler does not support, a backend failure), rather than a failure of this call
    (out of memory, a CUDA error) that the next call need not meet."""
    pending, seen = [error], set()
    while pending:  # an out-of-memory anywhere in the chain (autotuning, the first run) is transient
        cause = pending.pop()
        if cause is None or id(cause) in seen:
            continue
        if isinstance(cause, torch.OutOfMemoryError):
            return False
        seen.add(id(cause))
        pending += [cause.__cause__, cause.__context__, getattr(cause, "inner_exception", None)]
    from torch._dynamo.exc import TorchDynamoException  # imported by now: the error came through dynamo
    return isinstance(error, TorchDynamoException)


def _is_cuda(x):
    return x.is_cuda


class LazyCompile:
    """`fn(x, *args)` through torch.compile(fn, **options) where `compiles_for(x)` (default: x is a CUDA
    tensor), compiled at the first such call; eagerly elsewhere and inside an outer compile (which
    traces fn itself).

    When torch.compile itself fails, or a call fails with a compiler error (dynamo's exceptions:
    BackendCompilerFailed, missing Triton), fn runs eagerly for the rest of the process, with one
    warning. Any other error of a call (out of memory, a CUDA error) propagates and the path stays
    on. `compiler` (torch.compile) and `compiles_for` may be replaced, as the tests do.
    """

    def __init__(self, fn, description, **options):
        self.fn, self.description, self.options = fn, description, options
        self.compiler, self.compiles_for = torch.compile, _is_cuda
        self.compiled, self.failed = None, False

    def __call__(self, x, *args):
        if self.failed or torch.compiler.is_compiling() or not self.compiles_for(x):
            return self.fn(x, *args)
        with COMPILE_LOCK:
            try:
                if not self.failed:  # read again under the lock: another thread's compile may have failed
                    if self.compiled is None:
                        self.compiled = self.compiler(self.fn, **self.options)
                    return self.compiled(x, *args)
            except Exception as error:
                if self.compiled is not None and not cannot_compile(error):
                    raise
                self.failed = True
                logger.warning("Could not compile %s (%s: %s); it runs eagerly from now on.", self.description,
                               type(error).__name__, error)
        return self.fn(x, *args)
