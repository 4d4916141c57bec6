"""torch.compile of each transformer block's forward, off unless asked for.

Each block's `forward` is compiled on its own (not the whole model, not `block.compile()`): the
module's `__call__` and its hooks stay eager, so block swap's forward hooks, which move weights in
place (`param.data = ...`), run as before and the compiled code reads whichever storage the
parameters hold at call time. Every block has the same code and shapes, so the blocks share one
compiled graph per distinct input shape (parameters are graph inputs, not constants). Each call
holds COMPILE_LOCK (wanvideo.modules.lazy_compile), so data_parallel's threads never enter a compiled
function while another thread compiles.

The CUDA-graph modes ('reduce-overhead', 'max-autotune') are refused. A CUDA graph writes its output
into a buffer that its next replay overwrites, and here one graph serves every block, each block's
output being the next block's input: the first forward fails ("accessing tensor output of CUDAGraphs
that has been overwritten by a subsequent run"). Making it work would take a copy of the activations
after every block and, since every block (and under block swap every upload) hands the graph its
parameters at other addresses, a recording per block or a copy of its weights per call; all to save
launch overhead of microseconds per kernel, against tens of milliseconds per block at video sizes
(72 ms for a 14B block at 480p on an H100, benchmarks/RESULTS.md).
"""
import logging
import types

import torch

from ..modules.lazy_compile import COMPILE_LOCK

logger = logging.getLogger(__name__)

COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def is_block_compiled(block):
    """Whether compile_blocks compiled this block's forward."""
    function = getattr(block.__dict__.get("forward"), "__func__", None)
    return getattr(function, "_wan_compiled_forward", False)


def compile_blocks(model, mode=None, dynamic=None, fullgraph=False, backend="inductor"):
    """Compile the forward of every block in model.blocks, in place; returns the model.

    mode, dynamic, fullgraph, backend: as torch.compile; mode one of COMPILE_MODES (the CUDA-graph
    modes are refused, see the module's docstring). Compilation happens lazily, at the first call of
    each new input shape. Blocks already compiled are left as they are.
    """
    if mode in CUDA_GRAPH_MODES:
        raise ValueError(f"compile mode {mode!r} captures CUDA graphs, which per-block compile cannot use: one "
                         "graph runs every block and its next replay overwrites the previous block's output. "
                         "Use 'default' or 'max-autotune-no-cudagraphs'.")
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(map(str, COMPILE_MODES))}.")
    if not isinstance(getattr(model, "blocks", None), torch.nn.ModuleList):
        raise TypeError(f"compile_blocks needs a model with a `blocks` ModuleList; got {type(model).__name__}.")
    compiled_forwards = {}  # one compiled function per block class, shared by its blocks
    compiled = 0
    for block in model.blocks:
        if is_block_compiled(block):
            continue
        block_class = type(block)
        if block_class not in compiled_forwards:
            function = _holding_compile_lock(torch.compile(block_class.forward, mode=mode, dynamic=dynamic,
                                                           fullgraph=fullgraph, backend=backend))
            function._wan_compiled_forward = True
            compiled_forwards[block_class] = function
        # An instance attribute shadows the class method, so nn.Module.__call__ and its hooks stay eager.
        # A bound method (not a closure over the block) is rebound by copy.deepcopy to the copy's block.
        block.forward = types.MethodType(compiled_forwards[block_class], block)
        compiled += 1
    logger.info("torch.compile (backend %s, mode %s) set on %d blocks; each compiles at its first call.",
                backend, mode or "default", compiled)
    return model


def _holding_compile_lock(compiled_forward):
    """compiled_forward(block, ...) called under COMPILE_LOCK (see the module's docstring)."""
    def forward(self, *args, **kwargs):
        with COMPILE_LOCK:
            return compiled_forward(self, *args, **kwargs)
    return forward


def uncompile_blocks(model):
    """Undo compile_blocks: every block runs its eager forward again."""
    for block in model.blocks:
        if is_block_compiled(block):
            del block.forward
    return model
