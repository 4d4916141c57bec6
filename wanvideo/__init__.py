"""Wan 2.1 video diffusion on one GPU or many; importable without ComfyUI."""
from .checkpoint import CheckpointError, CheckpointInfo, inspect_checkpoint, load_wan_model
from .modules.model import WanModel

__all__ = ["WanModel", "CheckpointError", "CheckpointInfo", "inspect_checkpoint", "load_wan_model"]
