"""The single-GPU engine: what makes one device run a placed model well.

    block_swap.py   blocks resting in pinned CPU memory, streamed in on a copy stream
    fp8_fast.py     fp8 x fp8 matmuls on Ada / Hopper tensor cores
    compile.py      per-block torch.compile
    parking.py      a model's device tensors moved to pinned host memory and back (stepping aside)

Each acts on a loaded WanModel from outside (hooks, attributes the model offers as seams); the
pipeline (wanvideo/pipeline.py) applies them in one order for every strategy.
"""
from .block_swap import BlockSwapper, BlockSwapSettings, enable_block_swap, get_block_swapper
from .compile import compile_blocks, is_block_compiled, uncompile_blocks
from .fp8_fast import enable_fp8_fast, fp8_fast_active, fp8_fast_supported, set_fp8_fast

__all__ = ["BlockSwapper", "BlockSwapSettings", "enable_block_swap", "get_block_swapper", "compile_blocks",
           "is_block_compiled", "uncompile_blocks", "enable_fp8_fast", "fp8_fast_active", "fp8_fast_supported",
           "set_fp8_fast"]
