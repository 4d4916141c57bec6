"""What ComfyUI's process asks of a worker group, and how it travels.

A `Request` always travels as safetensors bytes (`encode_request`: tensors by name, settings as
JSON in the header): to spawned workers through their multiprocessing queues, to workers started
by torchrun through a TCPStore. No class of ours is pickled: inside ComfyUI the parent knows this
package under the custom-node folder's name, which a spawned worker cannot import, and nothing
crossing the network is ever unpickled. `ServedModel` is what the torchrun workers publish about
their checkpoint, so a client there checks requests as the spawned runner does.
"""
import json
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ...sampling.loop import Conditioning
from .topology import ParallelDegrees

_TENSORS = ("timestep", "init_latent", "inpaint_latent", "inpaint_mask")  # optional tensors, by name
KINDS = ("sample", "forward", "shutdown")
_SETTINGS = ("kind", "request_id", "cfg", "steps", "shift", "scheduler", "denoise", "batch_cfg", "previews")


@dataclass
class Request:
    """kind 'sample': denoise `latents` (the start noise) [B, 16, F, H, W] with the sampler settings
      -> latents [B, 16, F, H, W].
    kind 'forward': one guided model evaluation of x = `latents` [B, C, F, H, W] at `timestep` [B]
      (0..1000) -> velocities [B, 16, F, H, W] (for checks and benchmarks).
    kind 'shutdown': the workers leave their loop and exit.
    degrees: the layout for this request; None lets the workers choose (choose_degrees with
      use_cfg = cfg != 1).
    """
    kind: str
    request_id: int = 0
    degrees: Optional[ParallelDegrees] = None
    latents: Optional[torch.Tensor] = None  # 'forward' also takes a list of [C, F_i, H_i, W_i] (ragged batch)
    positive: Optional[Conditioning] = None
    negative: Optional[Conditioning] = None
    cfg: float = 1.0
    timestep: Optional[torch.Tensor] = None
    steps: int = 30
    shift: float = 5.0
    scheduler: str = "unipc"
    denoise: float = 1.0
    init_latent: Optional[torch.Tensor] = None
    inpaint_latent: Optional[torch.Tensor] = None   # sampling.Inpaint's latent and mask (TI2V-5B i2v)
    inpaint_mask: Optional[torch.Tensor] = None
    batch_cfg: Optional[bool] = None
    previews: bool = False     # send the x0 prediction of every step with the progress

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Request kind {self.kind!r} is not one of {KINDS}.")


@dataclass(frozen=True)
class ServedModel:
    """What a client needs to know of the workers' checkpoint to check a request before sending it.
    path: the file as the workers see it (for messages); model_type: 't2v', 'i2v' or 'flf2v';
    patch_size (F, H, W); in_dim: input channels (the latents', plus y's for i2v); num_heads (for the
    layout); text_dim: the text embedding width; latent_channels: 16 (Wan 2.1, A14B) or 48 (TI2V-5B);
    needs: what `positive` must carry besides the text ('clip_fea' and 'y' for Wan 2.1 i2v / flf2v,
    'y' for I2V-A14B). Fields after num_heads are None from workers that do not publish them."""
    path: str
    model_type: str
    patch_size: tuple
    in_dim: int
    num_heads: int
    text_dim: Optional[int] = None
    latent_channels: Optional[int] = None
    needs: Optional[list] = None

    @classmethod
    def from_info(cls, info):
        """From a wanvideo.checkpoint.CheckpointInfo."""
        needs = (["clip_fea"] if info.image_embedding else []) + (["y"] if info.condition_channels else [])
        return cls(str(info.path), info.model_type, tuple(info.config["patch_size"]), int(info.config["in_dim"]),
                   int(info.config["num_heads"]), int(info.config["text_dim"]), int(info.latent_channels), needs)

    def to_json(self):
        return json.dumps({**self.__dict__, "patch_size": list(self.patch_size)})

    @classmethod
    def from_json(cls, text):
        fields = json.loads(text)
        return cls(**{**fields, "patch_size": tuple(fields["patch_size"])})


def _cpu_copy(tensor):
    if isinstance(tensor, (list, tuple)):
        return [_cpu_copy(t) for t in tensor]
    return None if tensor is None else tensor.detach().to("cpu").clone().contiguous()


def _cpu_conditioning(cond):
    if cond is None:
        return None
    return Conditioning(context=[_cpu_copy(c) for c in cond.context], clip_fea=_cpu_copy(cond.clip_fea),
                        y=_cpu_copy(cond.y))


def detached_request(**kwargs):
    """A Request whose tensors are private CPU copies (safe to share with other processes)."""
    for name in ("latents",) + _TENSORS:
        kwargs[name] = _cpu_copy(kwargs.get(name))
    for name in ("positive", "negative"):
        kwargs[name] = _cpu_conditioning(kwargs.get(name))
    return Request(**kwargs)


def encode_request(request):
    """Request -> safetensors bytes (tensors by name, settings as JSON metadata)."""
    tensors = {name: getattr(request, name) for name in _TENSORS if getattr(request, name) is not None}
    settings = {name: getattr(request, name) for name in _SETTINGS}
    settings["latents"] = _put_tensors(tensors, "latents", request.latents)
    settings["degrees"] = None if request.degrees is None else [request.degrees.cfg, request.degrees.ulysses,
                                                                 request.degrees.ring]
    for branch in ("positive", "negative"):
        cond = getattr(request, branch)
        settings[branch] = None if cond is None else len(cond.context)
        if cond is not None:
            tensors.update({f"{branch}.context.{i}": c for i, c in enumerate(cond.context)})
            tensors.update({f"{branch}.{name}": getattr(cond, name) for name in ("clip_fea", "y")
                            if getattr(cond, name) is not None})
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return save_safetensors(tensors, metadata={"request": json.dumps(settings)})


def decode_request(payload):
    """safetensors bytes from encode_request -> Request."""
    tensors = load_safetensors(payload)
    settings = json.loads(_metadata(payload)["request"])
    branches = {}
    for branch in ("positive", "negative"):
        count = settings.pop(branch)
        branches[branch] = None if count is None else Conditioning(
            context=[tensors[f"{branch}.context.{i}"] for i in range(count)],
            clip_fea=tensors.get(f"{branch}.clip_fea"), y=tensors.get(f"{branch}.y"))
    degrees = settings.pop("degrees")
    latents = _take_tensors(tensors, "latents", settings.pop("latents"))
    return Request(degrees=None if degrees is None else ParallelDegrees(*degrees), latents=latents, **branches,
                   **{name: tensors.get(name) for name in _TENSORS}, **settings)


def _put_tensors(tensors, name, value):
    """Store a tensor, a list of tensors or None under `name`; returns how to find it again."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        tensors[name] = value
        return "tensor"
    tensors.update({f"{name}.{i}": t for i, t in enumerate(value)})
    return len(value)


def _take_tensors(tensors, name, layout):
    if layout is None:
        return None
    return tensors[name] if layout == "tensor" else [tensors[f"{name}.{i}"] for i in range(layout)]


def _metadata(payload):
    """The JSON metadata of a safetensors byte string (8-byte little-endian header length, then JSON)."""
    header_length = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + header_length]).get("__metadata__", {})


def encode_tensor(value):
    """A tensor or a list of tensors -> safetensors bytes."""
    tensors = {}
    layout = _put_tensors(tensors, "value", value)
    return save_safetensors({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()},
                            metadata={"layout": json.dumps(layout)})


def decode_tensor(payload):
    return _take_tensors(load_safetensors(payload), "value", json.loads(_metadata(payload)["layout"]))
