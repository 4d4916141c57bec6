"""The built-in tiny Wan models: random checkpoints of the real architectures at toy size.

Wan 2.1 t2v / i2v / flf2v, and Wan 2.2 shapes: TI2V-5B-like ('ti2v', 48 channels), I2V-A14B-like
('i2v' without CLIP) and an A14B-like expert pair (two files, different seeds).
Tests and the example script write them to a temporary folder; nothing is downloaded. The header
carries the config (`wan_config` metadata), since the head count of a toy model cannot be read from
tensor shapes the way it is for the released models (128 channels per head).
"""
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import CONFIG_METADATA_KEY
from .modules.model import WanModel

TINY_CONFIG = dict(patch_size=(1, 2, 2), text_len=512, dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
                   out_dim=16, num_heads=4, num_layers=4, window_size=(-1, -1), qk_norm=True,
                   cross_attn_norm=True, eps=1e-6)
IN_DIMS = {"t2v": 16, "i2v": 36, "flf2v": 36, "ti2v": 48}
OUT_DIMS = {"ti2v": 48}  # TI2V-5B works in the Wan 2.2 VAE's 48 channels; the others in 16


def tiny_config(model_type="t2v", **overrides):
    """A tiny config of `model_type`: 't2v', 'i2v', 'flf2v' (Wan 2.1 shapes), 'ti2v' (TI2V-5B shapes:
    48 channels in and out); 'i2v' with image_embedding=False is shaped like Wan 2.2 I2V-A14B (no CLIP)."""
    config = dict(TINY_CONFIG, model_type=model_type, in_dim=IN_DIMS[model_type],
                  out_dim=OUT_DIMS.get(model_type, 16), image_embedding=model_type in ("i2v", "flf2v"))
    return dict(config, **overrides)


def make_tiny_state_dict(config, seed=0):
    """Random weights for a WanModel of `config`, every tensor non-trivial (norm weights away from 1,
    biases and the flf2v position embedding away from 0) so a wrong key mapping shows up."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(**config).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * noise
        elif key.endswith("bias") or key.endswith("emb_pos"):
            state[key] = 0.1 * noise
        elif len(shape) >= 2 and "modulation" not in key:
            fan_in = shape[1] * (shape[2] * shape[3] * shape[4] if len(shape) == 5 else 1)
            state[key] = noise / fan_in**0.5
        else:
            state[key] = noise / shape[-1] ** 0.5
    return state


def make_tiny_checkpoint(path, model_type="t2v", prefix="", dtype=torch.float32, seed=0, **overrides):
    """Write a tiny random Wan checkpoint to `path`; returns (path, config, state_dict)."""
    config = tiny_config(model_type, **overrides)
    state = make_tiny_state_dict(config, seed)
    save_file({prefix + k: v.to(dtype).contiguous() for k, v in state.items()}, str(path),
              metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    return path, config, state


def make_tiny_expert_pair(folder, model_type="t2v", seeds=(0, 1), **kwargs):
    """A tiny Wan 2.2 A14B-like expert pair: two files of the same architecture with different
    weights, named as the ComfyUI-repackaged experts are (the name is all that tells them apart).
    model_type 't2v' or 'i2v' (no CLIP, like I2V-A14B). kwargs go to make_tiny_checkpoint.
    Returns {'high_noise': (path, config, state), 'low_noise': (path, config, state)}."""
    if model_type == "i2v":
        kwargs.setdefault("image_embedding", False)
    return {expert: make_tiny_checkpoint(Path(folder) / f"wan2.2_tiny_{model_type}_{expert}.safetensors", model_type,
                                         seed=seed, **kwargs)
            for expert, seed in zip(("high_noise", "low_noise"), seeds)}


def make_header_only_checkpoint(path, config, prefix=""):
    """A bf16 safetensors file with the keys and shapes of a model of `config` (any size) and no
    data: the header is real, the data region is a hole that takes no disk space (a sparse file).
    For planning, inspection and CLI checks of real sizes without their weights."""
    from .checkpoint import build_meta_model
    header, offset = {}, 0
    for key, tensor in build_meta_model(config).state_dict().items():
        nbytes = 2 * tensor.numel()
        header[prefix + key] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path
