"""ComfyUI entry point: Wan 2.1 on one GPU or many.

ComfyUI imports this folder as a package; the modules inside import each other by their top-level
names (as the tests and the example script do), so the folder goes on sys.path first.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

_loaded = sys.modules.get("wanvideo")
if _loaded is not None and not os.path.abspath(getattr(_loaded, "__file__", "")).startswith(_HERE):
    raise ImportError(f"Another package already provides a top-level 'wanvideo' module ({_loaded.__file__}); "
                      "it conflicts with WanVideo Multi-GPU. Remove it from sys.path or uninstall it.")

from nodes_model_loading import NODE_CLASS_MAPPINGS as _LOADING, NODE_DISPLAY_NAME_MAPPINGS as _LOADING_NAMES  # noqa: E402
from nodes_sampler import NODE_CLASS_MAPPINGS as _SAMPLER, NODE_DISPLAY_NAME_MAPPINGS as _SAMPLER_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS = {**_LOADING, **_SAMPLER}
NODE_DISPLAY_NAME_MAPPINGS = {**_LOADING_NAMES, **_SAMPLER_NAMES}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
