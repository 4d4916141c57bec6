"""torch.compile of each transformer block's forward, off unless asked for.

Each block's `forward` is compiled on its own (not the whole model, not `block.compile()`): the
module's `__call__` and its hooks stay eager, so block swap's forward hooks, which move weights in
place (`param.data = ...`), run as before and the compiled code reads whichever storage the
parameters hold at call time. Every block has the same code and shapes, so the blocks share one
compiled graph per distinct input shape (parameters are graph inputs, not constants).
"""
import logging
import types

import torch

logger = logging.getLogger(__name__)

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def is_block_compiled(block):
    """Whether compile_blocks compiled this block's forward."""
    function = getattr(block.__dict__.get("forward"), "__func__", None)
    return getattr(function, "_wan_compiled_forward", False)


def compile_blocks(model, mode=None, dynamic=None, fullgraph=False, backend="inductor"):
    """Compile the forward of every block in model.blocks, in place; returns the model.

    mode, dynamic, fullgraph, backend: as torch.compile. Compilation happens lazily, at the first
    call of each new input shape. Blocks already compiled are left as they are. 'reduce-overhead'
    (CUDA graphs) expects weights at fixed addresses, so do not combine it with block swap.
    """
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
            function = torch.compile(block_class.forward, mode=mode, dynamic=dynamic, fullgraph=fullgraph,
                                     backend=backend)
            function._wan_compiled_forward = True
            compiled_forwards[block_class] = function
        # An instance attribute shadows the class method, so nn.Module.__call__ and its hooks stay eager.
        # A bound method (not a closure over the block) is rebound by copy.deepcopy to the copy's block.
        block.forward = types.MethodType(compiled_forwards[block_class], block)
        compiled += 1
    logger.info("torch.compile (backend %s, mode %s) set on %d blocks; each compiles at its first call.",
                backend, mode or "default", compiled)
    return model


def uncompile_blocks(model):
    """Undo compile_blocks: every block runs its eager forward again."""
    for block in model.blocks:
        if is_block_compiled(block):
            del block.forward
    return model
