"""The denoising loop: noise -> latent video, with classifier-free guidance and a flow solver.

Works on any callable with the official Wan 2.1 signature
    model(x: list of [C, F, H, W], t: [N], context: list of [L, text_dim], seq_len=None,
          clip_fea=[N, 257 or 514, 1280] or None, y=list of [C', F, H, W] or None)
      -> list of N [16, F, H, W] float32 velocities,
so a plain WanModel and every parallel strategy wrapped around one run through the same loop.
Latents are in model space (not ComfyUI's normalised LATENT); the node layer converts.
"""
import logging
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from tqdm.auto import tqdm

from .experts import ExpertPair, move_to
from .schedulers import NUM_TRAIN_TIMESTEPS, SCHEDULERS, flow_sigmas, make_scheduler

logger = logging.getLogger(__name__)

__all__ = ["Conditioning", "Inpaint", "check_inputs", "make_noise", "sample_video", "token_timesteps"]


@dataclass
class Conditioning:
    """One guidance branch (positive or negative) for a batch of B videos.

    context:  B text embeddings [L, 4096] (umt5-xxl; L <= 512), a list or a [B, L, 4096] tensor
    clip_fea: [B, 257 (i2v) or 514 (flf2v), 1280] CLIP image tokens, or None (t2v)
    y:        [B, 20, F, H, W] i2v mask (4) and image latents (16), or None (t2v)
    A negative branch without clip_fea / y takes the positive's: Wan 2.1 guides on the text only.
    """
    context: List[torch.Tensor]
    clip_fea: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None


@dataclass
class Inpaint:
    """Keep part of the video fixed while the rest is generated (Wan 2.2 TI2V-5B image-to-video:
    ComfyUI's Wan22ImageToVideoLatent LATENT with its noise_mask; diffusers' expand_timesteps).

    latent: [B or 1, C, F, H, W] the clean latents to keep (model space, like the noise)
    mask:   [B or 1, 1 or C, F, H, W] 1 = generate, 0 = keep (fractions blend)
    Before every model call the state becomes x * mask + latent * (1 - mask), and the model gets a
    timestep per token: sigma * 1000 * the mean of the mask over the token's latent frame (ComfyUI's
    WAN22.process_timestep); after the last step the kept region is `latent`.
    """
    latent: torch.Tensor
    mask: torch.Tensor


def _check_inpaint(inpaint, batch, channels, frame_shape):
    """An Inpaint (or a (latent, mask) pair) that fits the noise -> Inpaint, else a clear error."""
    if inpaint is None:
        return None
    if isinstance(inpaint, (tuple, list)) and len(inpaint) == 2:
        inpaint = Inpaint(*inpaint)
    if not isinstance(inpaint, Inpaint):
        raise TypeError(f"inpaint must be an Inpaint(latent, mask) or a (latent, mask) pair; got {type(inpaint).__name__}.")
    for name, tensor, widths in (("latent", inpaint.latent, (channels,)), ("mask", inpaint.mask, (1, channels))):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 5 or tensor.shape[0] not in (1, batch) \
                or tensor.shape[1] not in widths or tuple(tensor.shape[2:]) != frame_shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"inpaint.{name} has shape {shape}; it must be [{batch} or 1, "
                             f"{' or '.join(map(str, widths))}, {', '.join(map(str, frame_shape))}] like the noise.")
    return inpaint


def token_timesteps(sigma, mask, patch_size=(1, 2, 2)):
    """The per-token timesteps [B, L] float32 of a step at `sigma` under an inpainting mask
    [B, C, F, H, W] (1 = generate): ComfyUI's WAN22.process_timestep, t_frame[b, f] = sigma * 1000 *
    mean(mask[b, :, f]), given to every token of latent frame f (tokens in F, H, W order of the patch
    grid; a temporal patch of several frames takes their mean)."""
    mask = mask.double()
    frames = mask.mean(dim=(1, 3, 4))                                     # [B, F]
    pf, ph, pw = patch_size
    frames = frames.unflatten(1, (-1, pf)).mean(dim=2)                    # [B, F / pf]
    per_frame = (mask.shape[3] // ph) * (mask.shape[4] // pw)
    return (sigma * NUM_TRAIN_TIMESTEPS * frames).repeat_interleave(per_frame, dim=1).float()


def make_noise(shape, seed, device="cpu"):
    """Standard normal float32 noise of `shape`, drawn on the CPU from `seed` (as ComfyUI does), so a
    seed gives the same video on any device; then moved to `device`."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def _state_device(model, noise):
    """Where the latent state lives: the model's device (a `device` attribute, else its first
    parameter), else the noise's."""
    device = getattr(model, "device", None)
    if device is None and isinstance(model, torch.nn.Module):
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    return torch.device(device) if device is not None else noise.device


def _check_branch(cond, name, batch, frame_shape, fallback=None, text_dim=None):
    """Raise a clear error when a branch does not fit the batch (or the model's text width);
    returns (context, clip_fea, y)."""
    if not isinstance(cond, Conditioning):
        raise TypeError(f"{name} must be a Conditioning; got {type(cond).__name__}.")
    context = list(cond.context)
    if len(context) != batch:
        raise ValueError(f"{name}.context has {len(context)} text embeddings for a batch of {batch} videos; "
                         "give one per video.")
    for i, text in enumerate(context):
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[0] < 1:
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"{name}.context[{i}] has shape {shape}; a text embedding is [L, {text_dim or 'width'}] "
                             "with at least one token.")
        if text_dim is not None and text.shape[1] != text_dim:
            # said here, not as the first Linear's "mat1 and mat2 shapes cannot be multiplied"
            raise ValueError(f"{name}.context[{i}] is {text.shape[1]} wide; this model takes text embeddings "
                             f"{text_dim} wide (umT5-XXL for Wan): encode the prompt with the Wan text encoder.")
    clip_fea = cond.clip_fea if cond.clip_fea is not None else (fallback.clip_fea if fallback else None)
    y = cond.y if cond.y is not None else (fallback.y if fallback else None)
    if clip_fea is not None and clip_fea.shape[0] != batch:
        raise ValueError(f"{name}.clip_fea has batch {clip_fea.shape[0]}; the noise has {batch}.")
    if y is not None and (y.dim() != 5 or y.shape[0] != batch or tuple(y.shape[2:]) != frame_shape):
        raise ValueError(f"{name}.y has shape {tuple(y.shape)}; it must be [{batch}, C, {', '.join(map(str, frame_shape))}] "
                         "like the noise (mask and image latents of the same size).")
    return context, clip_fea, y


def _prepare_branch(cond, name, batch, frame_shape, device, fallback=None):
    """Validate one branch and move it to `device`; returns (context list, clip_fea, y list or None)."""
    context, clip_fea, y = _check_branch(cond, name, batch, frame_shape, fallback)
    return ([c.to(device) for c in context],
            None if clip_fea is None else clip_fea.to(device),
            None if y is None else list(y.to(device, torch.float32)))


def _join_branches(branches):
    """Several branches -> one model batch, in order."""
    context = [c for branch in branches for c in branch[0]]
    clip_parts = [branch[1] for branch in branches]
    y_parts = [branch[2] for branch in branches]
    if any(p is None for p in clip_parts) != all(p is None for p in clip_parts):
        raise ValueError("One guidance branch has clip_fea and another has none; give both or neither.")
    clip_fea = None if clip_parts[0] is None else torch.cat(clip_parts)
    if any(p is None for p in y_parts) != all(p is None for p in y_parts):
        raise ValueError("One guidance branch has y and another has none; give both or neither.")
    y = None if y_parts[0] is None else [item for part in y_parts for item in part]
    return context, clip_fea, y


def _velocity(model, x, sigma, branches, seq_len, t_tokens=None):
    """One model call for x [B, 16, F, H, W] under each branch in turn -> [len(branches) * B, 16, F, H, W].
    t_tokens: per-token timesteps [B, seq_len] (inpainting) instead of sigma * 1000 for every token."""
    context, clip_fea, y = _join_branches(branches)
    copies = len(branches)
    if t_tokens is None:
        t = torch.full((copies * x.shape[0],), sigma * NUM_TRAIN_TIMESTEPS, dtype=torch.float32, device=x.device)
    else:
        t = t_tokens.to(x.device).repeat(copies, 1)
    out = model(list(x) * copies, t, context, seq_len=seq_len, clip_fea=clip_fea, y=y)
    return torch.stack([o.to(x.device, torch.float32) for o in out])


def check_inputs(noise, positive, negative=None, cfg=5.0, denoise=1.0, init_latent=None, patch_size=(1, 2, 2),
                 steps=None, shift=None, scheduler=None, text_dim=None, inpaint=None):
    """Every error sample_video would raise about its inputs, without running anything: the one
    input check of the nodes, the example and the distributed client (before it sends a request
    to its workers). steps, shift, scheduler: checked when given; text_dim: the model's text
    embedding width (4096 for umT5-XXL), checked against every context when given; inpaint: an
    Inpaint (or (latent, mask)) checked against the noise. Returns the inpaint as an Inpaint (or None)."""
    if not isinstance(noise, torch.Tensor) or noise.dim() != 5 or min(noise.shape) < 1:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be [B, 16, F, H, W] with every size at least 1; got {shape}. A video is at "
                         "least 16x16 pixels and 1 frame.")
    if isinstance(cfg, bool) or not (isinstance(cfg, (int, float)) and math.isfinite(cfg) and cfg >= 1):
        raise ValueError(f"cfg must be a finite number of at least 1 (1: no guidance; Wan uses 5 to 6); got {cfg!r}.")
    if steps is not None or shift is not None:  # raises for a bad steps, shift or denoise, with the value
        flow_sigmas(1 if steps is None else steps, 1.0 if shift is None else shift, denoise)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}; choose one of {', '.join(map(repr, SCHEDULERS))}.")
    if isinstance(denoise, bool) or not (isinstance(denoise, (int, float)) and 0 < denoise <= 1):
        raise ValueError(f"denoise must be in (0, 1]; got {denoise!r}. Use 1.0 to generate from pure noise.")
    guided = cfg != 1
    if guided and negative is None:
        raise ValueError(f"cfg={cfg} needs a negative Conditioning; pass one, or set cfg to 1.0 to sample "
                         "without guidance.")
    if denoise < 1 and init_latent is None:
        raise ValueError(f"denoise={denoise} needs init_latent (the latents to start from); pass it, or use "
                         "denoise=1.0 to generate from pure noise.")
    if init_latent is not None and init_latent.shape != noise.shape:
        raise ValueError(f"init_latent has shape {tuple(init_latent.shape)}; the noise has {tuple(noise.shape)}.")
    batch, frame_shape = noise.shape[0], tuple(noise.shape[2:])
    if any(n % p for n, p in zip(frame_shape, patch_size)):
        raise ValueError(f"Latent frames x height x width {frame_shape} must divide by the patch size "
                         f"{tuple(patch_size)}: use a video width and height that are multiples of 16.")
    inpaint = _check_inpaint(inpaint, batch, noise.shape[1], frame_shape)
    _check_branch(positive, "positive", batch, frame_shape, text_dim=text_dim)
    if guided:
        _check_branch(negative, "negative", batch, frame_shape, fallback=positive, text_dim=text_dim)
    return inpaint


def sample_video(model: Callable, noise: torch.Tensor, positive: Conditioning, negative: Optional[Conditioning] = None,
                 steps=30, cfg=5.0, shift=5.0, scheduler="unipc", denoise=1.0, init_latent=None, batch_cfg=None,
                 callback=None, check_interrupt=None, progress=True, cfg_low_noise=None, inpaint=None):
    """Denoise `noise` [B, 16, F, H, W] (model space) into latents [B, 16, F, H, W] float32 on noise.device.

    model: a denoiser, or an ExpertPair (Wan 2.2 A14B, sampling/experts.py): each step runs the
      expert the pair names for its timestep, guided by `cfg` (high-noise) or `cfg_low_noise`
      (low-noise; None: cfg); the latents and the solver's history follow the active expert's device.

    cfg: guidance scale; the velocity is uncond + cfg * (cond - uncond). At cfg == 1 the negative
      branch is never evaluated. batch_cfg: evaluate cond and uncond in one call of 2B items
      (positive first) instead of two calls; default `model.prefers_batched_cfg` (else False).
    shift, steps, denoise: the schedule, see `flow_sigmas`. denoise < 1 needs `init_latent`
      [B, 16, F, H, W]; the start is sigma0 * noise + (1 - sigma0) * init_latent.
    scheduler: 'unipc' (Wan's default), 'euler' or 'dpm++'.
    callback(step_index, total_steps, x0_prediction [B, 16, F, H, W]) runs after each step;
    check_interrupt() runs before each step and cancels by raising.
    inpaint: an Inpaint (or a (latent, mask) pair): the region where mask is 0 is kept at `latent`
      and its tokens get timestep 0 (Wan 2.2 TI2V-5B image-to-video); see Inpaint. None: every token
      is generated with one timestep (the uniform path, unchanged).
    """
    pair = model if isinstance(model, ExpertPair) else None
    if pair is None and cfg_low_noise is not None:
        raise ValueError(f"cfg_low_noise={cfg_low_noise} is the low-noise expert's guidance scale (Wan 2.2 A14B); "
                         "this model is a single one: leave it None and use cfg.")
    checked_cfg = cfg if pair is None else pair.check_guidance(cfg, cfg_low_noise)
    check_inputs(noise, positive, negative, checked_cfg, denoise, init_latent,
                 getattr(model, "patch_size", (1, 2, 2)), steps, shift, scheduler, getattr(model, "text_dim", None),
                 inpaint)
    sigmas = flow_sigmas(steps, shift, denoise)
    scales = [cfg] * steps if pair is None else pair.guidance_scales(sigmas, cfg, cfg_low_noise)
    guided = any(scale != 1 for scale in scales)

    solver = make_scheduler(scheduler, sigmas)
    device = _state_device(model, noise)
    batch, frame_shape = noise.shape[0], tuple(noise.shape[2:])
    pos = _prepare_branch(positive, "positive", batch, frame_shape, device)
    neg = _prepare_branch(negative, "negative", batch, frame_shape, device, fallback=positive) if guided else None
    patch = getattr(model, "patch_size", (1, 2, 2))
    seq_len = math.prod(n // p for n, p in zip(frame_shape, patch))

    x = noise.to(device, torch.float32)
    if init_latent is not None:
        sigma0 = sigmas[0].item()
        x = sigma0 * x + (1 - sigma0) * init_latent.to(device, torch.float32)
    keep = _check_inpaint(inpaint, batch, noise.shape[1], frame_shape)
    if keep is not None:  # the kept latents and the mask, on the state's device, broadcast to the batch
        keep = (keep.latent.to(device, torch.float32).expand(batch, -1, -1, -1, -1),
                keep.mask.to(device, torch.float32).expand(batch, -1, -1, -1, -1))
    logger.debug("Sampling %s: %d steps, cfg %s, shift %s, denoise %s, sigmas %.4f..%.4f on %s", scheduler, steps,
                 cfg, shift, denoise, sigmas[0].item(), sigmas[-2].item(), device)

    with tqdm(total=steps, disable=not progress, desc=f"Wan {scheduler}") as bar:
        for i in range(steps):
            if check_interrupt is not None:
                check_interrupt()
            sigma, scale, denoiser = sigmas[i].item(), scales[i], model
            if pair is not None:  # this step's expert, made ready by the pair; the state follows its device
                denoiser = pair.before_step(i, sigmas)
                if _state_device(denoiser, x) != device:
                    device = _state_device(denoiser, x)
                    x, pos, neg, keep = move_to(device, x, pos, neg, keep)
                    solver.to(device)
            t_tokens = None
            if keep is not None:  # ComfyUI's KSamplerX0Inpaint blend and WAN22.process_timestep
                x = x * keep[1] + keep[0] * (1 - keep[1])
                t_tokens = token_timesteps(sigma, keep[1], patch)
                if bool((t_tokens == torch.tensor(sigma * NUM_TRAIN_TIMESTEPS, dtype=torch.float32)).all()):
                    t_tokens = None  # nothing kept this step: the uniform call, bit for bit
            if scale == 1:
                velocity = _velocity(denoiser, x, sigma, [pos], seq_len, t_tokens)
            elif batch_cfg if batch_cfg is not None else getattr(denoiser, "prefers_batched_cfg", False):
                cond, uncond = _velocity(denoiser, x, sigma, [pos, neg], seq_len, t_tokens).split(batch)
                velocity = uncond + scale * (cond - uncond)
            else:
                cond = _velocity(denoiser, x, sigma, [pos], seq_len, t_tokens)
                uncond = _velocity(denoiser, x, sigma, [neg], seq_len, t_tokens)
                velocity = uncond + scale * (cond - uncond)
            x0 = x - sigma * velocity
            if keep is not None:  # the x0 prediction keeps the clean latents (KSamplerX0Inpaint's second blend)
                x0 = x0 * keep[1] + keep[0] * (1 - keep[1])
                velocity = velocity * keep[1] + (1 - keep[1]) * (x - keep[0]) / sigma  # = (x - x0) / sigma
            x = solver.step(velocity, x, i)
            del velocity
            if callback is not None:
                callback(i, steps, x0)
            bar.update(1)
    if keep is not None:  # the kept region is exactly the clean latents
        x = x * keep[1] + keep[0] * (1 - keep[1])
    return x.to(noise.device)
