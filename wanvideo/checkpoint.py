"""Wan 2.1 and 2.2 checkpoints: header inspection and memory-mapped loading.

`inspect_checkpoint` reads only the safetensors header (a few hundred KB even for 14B) and tells
the variant (Wan 2.1 or 2.2 where the keys tell), the size, the WanModel config, the latent space
and the bytes of every block. `load_wan_model` builds the model on the meta device and fills it
tensor by tensor from the memory-mapped file, straight to the target device and dtype, so no full
copy of the model ever sits in RAM.

Safetensors only: pickle checkpoints are refused, never opened.
"""
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Optional

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open

from .devices import DeviceOutOfMemoryError, release_memory
from .latent_format import latent_format_for
from .modules.model import WanModel
from .quantization import FP8_DTYPES, QUANTIZATION_MODES, replace_linears_with_fp8

logger = logging.getLogger(__name__)

KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
HEAD_DIM = 128  # every released Wan 2.1 and 2.2 model uses 128 channels per attention head
CONFIG_METADATA_KEY = "wan_config"  # optional JSON WanModel config in the header's metadata
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
MARKER_KEYS = ("scaled_fp8",)  # ComfyUI's marker tensor in scaled fp8 files

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Key fragments of other architectures, to say what a wrong file is instead of just "not Wan".
OTHER_ARCHITECTURES = (
    ("input_blocks.", "a Stable Diffusion 1.x/2.x/XL UNet"),
    ("double_blocks.", "a Flux transformer"),
    ("joint_blocks.", "a Stable Diffusion 3 MMDiT"),
    ("condition_embedder.", "a Wan model in diffusers format (use the original or ComfyUI-repackaged file)"),
    ("transformer_blocks.", "a diffusers-format transformer"),
    ("encoder.block.", "a T5 text encoder (it belongs in models/text_encoders)"),
    ("decoder.", "a VAE (it belongs in models/vae)"),
    ("lora_", "a LoRA (load it with the LoRA node)"),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with what was wrong and what to do."""


@dataclass
class CheckpointInfo:
    path: str
    prefix: str                 # stripped from every key ('' for official files)
    model_type: str             # 't2v', 'i2v', 'flf2v' (Wan 2.1) or 'ti2v' (Wan 2.2 5B); see MODEL_TYPES
    size_name: str              # '1.3B', '5B', '14B', or the parameter count for other sizes
    config: dict                # WanModel constructor arguments
    stored_dtype: torch.dtype   # dtype of most block weights in the file
    num_parameters: int
    parameter_bytes: int        # as stored in the file
    block_bytes: list = field(default_factory=list)   # per block, as stored
    fp8_scaled: bool = False    # per-tensor scale_weight keys present
    keys: list = field(default_factory=list, repr=False)   # model keys, prefix stripped
    # '2.1', '2.2', or '2.1/2.2' where nothing tells (a 14B t2v file: Wan 2.1 and a Wan 2.2 A14B
    # expert have the same keys; a file name with 'wan2.2', 'high_noise' or 'low_noise' decides)
    family: str = "2.1"
    expert: Optional[str] = None  # 'high_noise' / 'low_noise' (A14B, from the file name), else None

    @property
    def num_layers(self):
        return self.config["num_layers"]

    @property
    def image_embedding(self):
        """True when the model takes CLIP image tokens (clip_fea): Wan 2.1 i2v and flf2v."""
        return self.config.get("image_embedding", self.model_type in ("i2v", "flf2v"))

    @property
    def latent_format(self):
        """The VAE latent space (wanvideo.latent_format.WAN21 or WAN22), told by the output channels."""
        return latent_format_for(self.config["out_dim"])

    @property
    def latent_channels(self):
        """16 (Wan 2.1 VAE) or 48 (Wan 2.2 VAE, TI2V-5B)."""
        return self.latent_format.channels

    @property
    def vae_stride(self):
        """(4, 8, 8) or (4, 16, 16): video frames and pixels per latent frame and latent pixel."""
        return self.latent_format.stride

    @property
    def condition_channels(self):
        """Channels of y (mask and image latents) concatenated to the noise: 20 for i2v, else 0."""
        return self.config["in_dim"] - self.config["out_dim"]

    @property
    def model_name(self):
        """'Wan 2.1 t2v 1.3B', 'Wan 2.2 TI2V 5B', 'Wan 2.2 I2V A14B (no CLIP) high-noise expert',
        'Wan 2.1/2.2 t2v 14B', ..."""
        if self.family != "2.2":
            return f"Wan {self.family} {self.model_type} {self.size_name}"
        size = "A14B" if self.size_name == "14B" else self.size_name  # the official names: T2V-A14B, TI2V-5B
        no_clip = " (no CLIP)" if self.model_type == "i2v" else ""  # Wan 2.2 i2v takes the image as latents only
        return (f"Wan 2.2 {self.model_type.upper()} {size}{no_clip}"
                + (f" {self.expert.replace('_', '-')} expert" if self.expert else ""))

    @property
    def other_bytes(self):
        """Bytes outside the blocks (embeddings, head, img_emb)."""
        return self.parameter_bytes - sum(self.block_bytes)

    def bytes_at(self, base_dtype, quantization="disabled"):
        """(bytes of one block, bytes outside the blocks) once loaded in this precision."""
        base = torch.finfo(base_dtype).bits // 8
        block = build_meta_model(self.config).blocks[0]
        linear_weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
        block_elements = sum(t.numel() for t in block.state_dict().values())
        linear_bytes = 1 if quantization in FP8_DTYPES else base
        block_bytes = linear_weights * linear_bytes + (block_elements - linear_weights) * base
        return block_bytes, (self.num_parameters - self.num_layers * block_elements) * base

    def summary(self):
        return (f"{self.model_name} (dim {self.config['dim']}, {self.num_layers} blocks, "
                f"{_count(self.num_parameters)} parameters, {self.parameter_bytes / 2**20:,.1f} MiB as stored in "
                f"{str(self.stored_dtype).replace('torch.', '')})")


def _count(n):
    """1.42e9 -> '1.42B', 6.1e5 -> '0.61M'."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def is_pickle_file(path):
    """True for a pickle checkpoint, by its suffix or its first bytes (it is never unpickled)."""
    with open(path, "rb") as f:
        start = f.read(9)
    looks_like_safetensors = start[8:9] == b"{"  # 8-byte header length, then the JSON header
    # torch.save writes a zip archive ("PK"); older pickles start with the PROTO opcode 0x80.
    return os.fspath(path).lower().endswith(PICKLE_SUFFIXES) or (
        not looks_like_safetensors and (start[:2] == b"PK" or start[:1] == b"\x80"))


def _refuse_non_safetensors(path):
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint not found: {path!r}. Check the path, or put the file in ComfyUI's "
                              "models/diffusion_models folder.")
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a folder; give the path of a .safetensors file.")
    if is_pickle_file(path):
        raise CheckpointError(f"{path!r} is a pickle checkpoint; pickle files can run arbitrary code and are never "
                              "opened here. Use the .safetensors release of the model (or convert it with a trusted tool).")


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def _corrupt(path, detail):
    return CheckpointError(f"{path!r} is not a readable safetensors file ({detail}). The file is truncated, "
                           "corrupted or of another format; download it again.")


def read_safetensors_header(path):
    """Only the JSON header of a safetensors file -> ({name: {'dtype', 'shape'}}, metadata).

    Reads a few hundred KB, never maps the data, so it works on a 28 GB file on a small machine.
    """
    _refuse_non_safetensors(path)
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path!r} is {size} bytes long: too short for a safetensors file. It is truncated; "
                              "download it again.")
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        if header_length > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {header_length} is implausible")
        if 8 + header_length > size:
            raise _corrupt(path, f"header of {header_length} bytes but the file has only {size - 8}: truncated")
        try:
            header = json.loads(f.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _corrupt(path, f"header is not valid JSON: {error}") from error
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_length
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES or "shape" not in entry:
            raise _corrupt(path, f"entry {name!r} is malformed")
        if entry.get("data_offsets", [0, 0])[1] > data_size:
            raise _corrupt(path, f"tensor {name!r} lies beyond the end of the file: truncated")
    return header, metadata


def open_checkpoint(path):
    """safe_open (memory-mapped) with errors that say what to do."""
    read_safetensors_header(path)
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise _corrupt(path, str(error)) from error


def _find_prefix(keys):
    for prefix in ("",) + KEY_PREFIXES:
        if prefix + "patch_embedding.weight" in keys:
            return prefix
    return None


def _describe_foreign(keys):
    for fragment, what in OTHER_ARCHITECTURES:
        if any(fragment in k for k in keys):
            return what
    return "an unknown architecture"


def _variant(keys, in_dim, out_dim, dim, path):
    """(model_type, image_embedding, family, expert) from the keys and shapes; the file name decides
    only what the keys cannot tell (Wan 2.1 14B t2v and the Wan 2.2 A14B experts are alike, and the
    two experts are alike; ComfyUI does not tell them apart either)."""
    name = re.sub(r"[-\s]", "_", os.path.basename(path).lower())
    expert = next((e for e in ("high_noise", "low_noise") if e in name), None)
    if "img_emb.proj.1.weight" in keys:  # CLIP image branch: Wan 2.1 only
        return ("flf2v" if "img_emb.emb_pos" in keys else "i2v"), True, "2.1", None
    if out_dim == 48:  # the Wan 2.2 VAE's 48 channels (by out_dim: Fun-Control 2.1 files take 48 in, give 16)
        return "ti2v", False, "2.2", None
    if in_dim == out_dim + 20:  # noise + 4 mask + 16 image-latent channels without CLIP: I2V-A14B
        return "i2v", False, "2.2", expert
    if expert or re.search(r"wan_?2[._]?2", name):
        return "t2v", False, "2.2", expert
    undecided = dim == 5120 and not re.search(r"wan_?2[._]?1", name)
    return "t2v", False, "2.1/2.2" if undecided else "2.1", None


def inspect_checkpoint(path):
    """Read only the header of a Wan 2.1 or 2.2 safetensors file -> CheckpointInfo."""
    path = os.fspath(path)
    header, metadata = read_safetensors_header(path)
    all_keys = list(header)
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: v["dtype"] for k, v in header.items()}

    prefix = _find_prefix(set(all_keys))
    if prefix is None or not any(k.startswith(prefix + "blocks.0.self_attn.q.") for k in all_keys):
        examples = ", ".join(all_keys[:3]) or "no tensors at all"
        raise CheckpointError(f"{path!r} is not a Wan 2.1 diffusion model (nor 2.2): it looks like "
                              f"{_describe_foreign(all_keys)} (keys such as {examples}). Choose a Wan 2.1 or 2.2 "
                              "file (keys patch_embedding.weight, "
                              "blocks.N.self_attn.q.weight, head.head.weight).")
    model_keys = [k[len(prefix):] for k in all_keys if k.startswith(prefix) and k not in MARKER_KEYS]
    shape = lambda k: shapes[prefix + k]

    block_ids = sorted({int(m.group(1)) for k in model_keys if (m := re.match(r"blocks\.(\d+)\.", k))})
    if block_ids != list(range(len(block_ids))):
        raise CheckpointError(f"{path!r} has gaps in its block numbering ({block_ids[:5]}...); the file is incomplete.")
    dim, in_dim, *patch = shape("patch_embedding.weight")
    out_dim = shape("head.head.weight")[0] // math.prod(patch)
    model_type, image_embedding, family, expert = _variant(set(model_keys), in_dim, out_dim, dim, path)
    config = dict(
        model_type=model_type, patch_size=tuple(patch), text_len=512, in_dim=in_dim, dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0], freq_dim=shape("time_embedding.0.weight")[1],
        text_dim=shape("text_embedding.0.weight")[1], out_dim=out_dim,
        num_heads=max(1, dim // HEAD_DIM), num_layers=len(block_ids), window_size=(-1, -1),
        qk_norm="blocks.0.self_attn.norm_q.weight" in model_keys,
        cross_attn_norm="blocks.0.norm3.weight" in model_keys, eps=1e-6, image_embedding=image_embedding)
    if CONFIG_METADATA_KEY in metadata:  # files made by this package (tiny test models) say their head count
        config.update(json.loads(metadata[CONFIG_METADATA_KEY]))
        config["patch_size"] = tuple(config["patch_size"])
        config["window_size"] = tuple(config["window_size"])

    weight_keys = [k for k in model_keys if not k.endswith(SCALE_SUFFIXES)]
    numel = {k: math.prod(shape(k)) for k in weight_keys}
    nbytes = {k: numel[k] * SAFETENSORS_DTYPES[dtypes[prefix + k]].itemsize for k in weight_keys}
    block_bytes = [0] * len(block_ids)
    for k in weight_keys:
        if k.startswith("blocks."):
            block_bytes[int(k.split(".")[1])] += nbytes[k]
    stored = [dtypes[prefix + k] for k in weight_keys if k.startswith("blocks.0.") and k.endswith("q.weight")]
    num_parameters = sum(numel.values())
    size_name = {1536: "1.3B", 3072: "5B", 5120: "14B"}.get(dim, _count(num_parameters))
    return CheckpointInfo(
        path=path, prefix=prefix, model_type=model_type, size_name=size_name, config=config,
        stored_dtype=SAFETENSORS_DTYPES[stored[0]], num_parameters=num_parameters,
        parameter_bytes=sum(nbytes.values()), block_bytes=block_bytes,
        fp8_scaled=any(k.endswith(".scale_weight") for k in model_keys), keys=model_keys, family=family,
        expert=expert)


def check_keys(info, expected_keys):
    found = {k for k in info.keys if not k.endswith(SCALE_SUFFIXES)}
    expected_keys = {k for k in expected_keys if not k.endswith(SCALE_SUFFIXES)}
    missing = sorted(set(expected_keys) - found)
    unexpected = sorted(found - set(expected_keys))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
        raise CheckpointError(f"{info.path!r} does not match the {info.model_name} architecture: "
                              f"{'; '.join(parts)}. The file is incomplete or a different variant.")


def resolve_dtype(precision):
    """'fp32' / 'bf16' / 'fp16' or a torch.dtype -> torch.dtype."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in BASE_DTYPES:
        raise ValueError(f"base precision {precision!r} is not one of {', '.join(BASE_DTYPES)}.")
    return BASE_DTYPES[precision]


def build_meta_model(config, quantization="disabled"):
    """A WanModel of this config on the meta device (no memory), fp8 shells where quantized.

    accelerate's init_empty_weights puts each parameter on the meta device as it is registered;
    it is 1.2-1.5 s faster than a `torch.device("meta")` context for a process' first model
    (PyTorch's first meta-device initialisation; benchmarks/bench_accelerate.py, RESULTS.md)."""
    with init_empty_weights():
        model = WanModel(**config)
    if quantization != "disabled":
        replace_linears_with_fp8(model)
    return model


def _device_for(key, device, device_map):
    """The device of parameter `key`: the longest matching module prefix in device_map, else `device`."""
    if device_map:
        parts = key.split(".")
        for end in range(len(parts) - 1, 0, -1):
            target = device_map.get(".".join(parts[:end]))
            if target is not None:
                return torch.device(target)
    return device


def load_wan_model(path, device="cpu", base_precision="bf16", quantization="disabled", attention_mode="sdpa",
                   info=None, device_map=None):
    """Load a Wan 2.1 or 2.2 safetensors file into a WanModel on `device`.

    base_precision: 'fp32', 'bf16', 'fp16' (or a torch.dtype); quantization: 'disabled',
    'fp8_e4m3fn' or 'fp8_e5m2' (fp8 storage of the block Linear weights), or 'fp8_e4m3fn_fast'
    (stored as fp8_e4m3fn; the pipeline's load, wanvideo.pipeline.load_prepared_model, then turns on
    fp8 matmuls on GPUs of compute capability 8.9+ through wanvideo.engine.enable_fp8_fast). Files stored in fp8, with
    or without per-tensor scales, load in either mode: dequantized when quantization is disabled.
    device_map: optional {module name: device} placing those modules elsewhere (e.g.
    {"blocks.20": "cuda:1", "head": "cuda:1"}); every tensor goes from the file straight there.
    On any failure nothing stays allocated on any device.
    """
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATION_MODES)}.")
    path, dtype, device = os.fspath(path), resolve_dtype(base_precision), torch.device(device)
    info = info or inspect_checkpoint(path)
    model = build_meta_model(info.config, quantization)
    check_keys(info, model.state_dict().keys())
    fp8_dtype = FP8_DTYPES.get(quantization)
    fp8_modules = {name for name, m in model.named_modules() if hasattr(m, "scale_weight")}
    key_set = set(info.keys)

    state, target = {}, device
    try:
        with open_checkpoint(path) as f:
            for key in model.state_dict().keys():
                module_name = key.rpartition(".")[0]
                if key.endswith(".scale_weight"):
                    continue  # filled together with its weight
                target = _device_for(key, device, device_map)
                tensor = f.get_tensor(info.prefix + key)
                scale_key = module_name + ".scale_weight"
                scale = f.get_tensor(info.prefix + scale_key).float() if scale_key in key_set else None
                if module_name in fp8_modules and key.endswith(".weight"):
                    state[key], state[scale_key] = _to_fp8(tensor, scale, fp8_dtype, target)
                else:
                    if scale is not None and key.endswith(".weight"):  # fp8 file, high-precision model
                        tensor = tensor.to(torch.float32) * scale
                    state[key] = tensor.to(device=target, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
    except torch.OutOfMemoryError as error:
        state.clear()
        release_memory()
        raise DeviceOutOfMemoryError(f"Out of memory on {target} while loading {info.summary()}. Use fp8 "
                                     "quantization, block swap, or several GPUs.", target) from error
    except BaseException:
        state.clear()
        release_memory()
        raise
    model.set_attention_backend(attention_mode)
    model.eval().requires_grad_(False)
    model.checkpoint_info = info
    logger.info("Loaded %s on %s in %s%s", info.summary(), device if not device_map else "several devices",
                str(dtype).replace("torch.", ""), f" with {quantization} block weights" if quantization != "disabled" else "")
    return model


def _to_fp8(tensor, scale, fp8_dtype, device):
    """A block Linear weight as stored -> (fp8 weight, float32 scale) on device."""
    from .quantization import quantize_weight
    if tensor.dtype == fp8_dtype:  # already fp8 in the file: keep its bytes
        return tensor.to(device), (scale if scale is not None else torch.ones(())).to(device, torch.float32)
    if scale is not None:
        tensor = tensor.to(torch.float32) * scale
    weight, new_scale = quantize_weight(tensor.to(device), fp8_dtype)
    return weight, new_scale.to(torch.float32)
