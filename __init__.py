"""ComfyUI entry point: Wan 2.1 on one GPU or many.

ComfyUI imports this folder as a package; the node files import the library by relative imports
(`from .wanvideo import api`), so nothing of this pack goes on sys.path or takes a generic
top-level module name that another pack could meet. From a checkout, the tests, the example and
`multi_gpu_utils.py` import `wanvideo` from the repository root instead.
"""
from .nodes_model_loading import NODE_CLASS_MAPPINGS as _LOADING, NODE_DISPLAY_NAME_MAPPINGS as _LOADING_NAMES
from .nodes_sampler import NODE_CLASS_MAPPINGS as _SAMPLER, NODE_DISPLAY_NAME_MAPPINGS as _SAMPLER_NAMES

NODE_CLASS_MAPPINGS = {**_LOADING, **_SAMPLER}
NODE_DISPLAY_NAME_MAPPINGS = {**_LOADING_NAMES, **_SAMPLER_NAMES}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
