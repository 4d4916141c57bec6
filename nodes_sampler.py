"""The sampler node: ComfyUI's native Wan conditioning in, a LATENT for ComfyUI's VAEDecode out."""
import logging

import torch
import torch.nn.functional as F

from . import comfy_host
from .wanvideo.api import (CLIP_DIM, CLIP_TOKENS, LATENT_CHANNELS, SCHEDULERS, WAN21, Conditioning,
                           ExpertPairPipeline, Inpaint, check_video_size, denormalize_latents,
                           make_noise, normalize_latents)

logger = logging.getLogger(__name__)

MODEL_TYPE = "WANVIDEO_MGPU_MODEL"
MASK_CHANNELS = 4


def _conditioning_entry(conditioning, name, text_dim=4096):
    if not isinstance(conditioning, (list, tuple)) or not conditioning or len(conditioning[0]) != 2:
        raise ValueError(f"{name} is not ComfyUI CONDITIONING (a list of [tensor, dict]); connect a CLIPTextEncode "
                         "(CLIPLoader type 'wan') or WanImageToVideo output.")
    if len(conditioning) > 1:
        logger.warning("%s has %d entries (combined prompts); only the first is used.", name, len(conditioning))
    text, extras = conditioning[0]
    if text.dim() != 3 or text.shape[-1] != text_dim:
        raise ValueError(f"{name} holds text embeddings of shape {tuple(text.shape)}; this Wan model needs umT5-XXL "
                         f"embeddings (1, L, {text_dim}): load the text encoder with CLIPLoader type 'wan'.")
    return text, extras


def _image_condition(extras, batch, frames, height, width):
    """WanImageToVideo's concat_latent_image (raw) and concat_mask (1 = generate) -> y [B, 20, T, h, w]:
    4 mask channels (1 = known frame) then the normalised image latents, as Wan 2.1 expects."""
    image = extras.get("concat_latent_image")
    if image is None:
        return torch.zeros(batch, MASK_CHANNELS + LATENT_CHANNELS, frames, height, width)
    image = image.float()
    if tuple(image.shape[-2:]) != (height, width):
        image = torch.stack([F.interpolate(image[:, :, t], size=(height, width), mode="bilinear")
                             for t in range(image.shape[2])], dim=2)
    image = normalize_latents(image[:, :LATENT_CHANNELS, :frames])
    mask = extras.get("concat_mask")
    if mask is None:  # no mask: no frame is given as known (ComfyUI's WAN21 does the same)
        known = torch.zeros(1, 1, frames, height, width)
    else:
        mask = mask.float()
        if mask.shape[1] not in (1, MASK_CHANNELS):
            mask = mask.mean(dim=1, keepdim=True)
        known = 1.0 - mask
    if tuple(known.shape[-2:]) != (height, width):
        known = F.interpolate(known, size=(known.shape[2], height, width), mode="trilinear")
    known = F.pad(known[:, :, :frames], (0, 0, 0, 0, 0, frames - min(frames, known.shape[2])))
    known = known.expand(-1, MASK_CHANNELS, -1, -1, -1)
    if known.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"concat_mask has batch {known.shape[0]} but concat_latent_image has {image.shape[0]}; "
                         "give one mask, or one per image.")
    y = torch.cat([known.expand(image.shape[0], -1, -1, -1, -1), image], dim=1)
    return y.expand(batch, -1, -1, -1, -1) if y.shape[0] == 1 else y


def comfy_to_conditioning(conditioning, name, model_type, batch, latent_shape, text_dim=4096, image_embedding=None):
    """ComfyUI CONDITIONING -> one Conditioning branch for `batch` videos of latent shape (T, h, w);
    text_dim: the model's text embedding width (4096, umT5-XXL, for every released Wan model).
    model_type 't2v' and 'ti2v' (Wan 2.2 TI2V-5B: its image comes in the LATENT's noise_mask) take the
    text only; image_embedding False (Wan 2.2 I2V-A14B: i2v without CLIP) builds y from
    WanImageToVideo's concat_latent_image / concat_mask and ignores any clip_vision_output.
    image_embedding None: the Wan 2.1 rule (i2v and flf2v have CLIP)."""
    text, extras = _conditioning_entry(conditioning, name, text_dim)
    context = [text[min(i, text.shape[0] - 1)].float() for i in range(batch)]
    if model_type in ("t2v", "ti2v"):
        return Conditioning(context=context)
    if image_embedding is False:
        if extras.get("concat_latent_image") is None:
            if name == "negative":  # the loop gives it the positive's y
                return Conditioning(context=context)
            raise ValueError(f"The Wan 2.2 {model_type} model needs a start image in {name}: connect ComfyUI's "
                             "WanImageToVideo (start_image; no CLIP vision needed) and its positive / negative "
                             "outputs and latent to this sampler.")
        if extras.get("clip_vision_output") is not None:
            logger.debug("%s: clip_vision_output ignored (this model has no CLIP image embedding).", name)
        return Conditioning(context=context, y=_image_condition(extras, batch, *latent_shape))
    vision = extras.get("clip_vision_output")
    if vision is None:
        if name == "negative":  # Wan guides on the text: the negative takes the positive's image conditioning
            return Conditioning(context=context)
        raise ValueError(f"The {model_type} model needs CLIP vision features in {name}: connect CLIPVisionLoader -> "
                         "CLIPVisionEncode to WanImageToVideo's clip_vision_output (or use a text-to-video model).")
    clip_fea = getattr(vision, "penultimate_hidden_states", None)
    if clip_fea is None:
        clip_fea = vision["penultimate_hidden_states"]
    clip_fea = clip_fea.float()
    expected_tokens = CLIP_TOKENS * (2 if model_type == "flf2v" else 1)
    if clip_fea.dim() != 3 or clip_fea.shape[1:] != (expected_tokens, CLIP_DIM):
        raise ValueError(f"{name} has CLIP vision features of shape {tuple(clip_fea.shape)}; the {model_type} model "
                         f"needs [1, {expected_tokens}, {CLIP_DIM}] (CLIP-H penultimate states"
                         + (", start and end image: use WanFirstLastFrameToVideo" if model_type == "flf2v" else "")
                         + "). Load clip_vision_h with CLIPVisionLoader.")
    clip_fea = clip_fea.expand(batch, -1, -1) if clip_fea.shape[0] == 1 else clip_fea
    return Conditioning(context=context, clip_fea=clip_fea, y=_image_condition(extras, batch, *latent_shape))


def latent_mask(noise_mask, shape):
    """A LATENT's noise_mask (1 = generate, 0 = keep; [B, 1, T, h, w] from Wan22ImageToVideoLatent, or an
    image mask [B, H, W] / [B, 1, H, W]) -> [B or 1, 1, T, h, w] at the latent's size, resized
    trilinearly as ComfyUI's comfy.utils.reshape_mask does."""
    mask = noise_mask.float()
    while mask.dim() < 5:  # [H, W] -> [1, H, W] -> [B, 1, H, W] -> [B, 1, 1, H, W]
        mask = mask.unsqueeze(0) if mask.dim() < 3 else mask.unsqueeze(1)
    if mask.shape[1] != 1:
        mask = mask.mean(dim=1, keepdim=True)
    if tuple(mask.shape[2:]) != tuple(shape[2:]):
        mask = F.interpolate(mask, size=tuple(shape[2:]), mode="trilinear")
    if mask.shape[0] not in (1, shape[0]):
        raise ValueError(f"The latent's noise_mask has batch {mask.shape[0]}; its samples have {shape[0]}.")
    return mask.clamp(0, 1)


def expert_arguments(model, boundary, cfg_low_noise):
    """The sampler's boundary (0: official) and cfg_low_noise (-1: cfg) -> generate's keyword
    arguments for a Wan 2.2 A14B pair; a single model takes none (a warning if they were set)."""
    if not isinstance(model, ExpertPairPipeline):
        if boundary > 0 or cfg_low_noise >= 0:
            logger.warning("boundary and cfg_low_noise apply to a Wan 2.2 A14B expert pair (a loader with a "
                           "low_noise_model); this model is a single one, so they are ignored.")
        return {}
    arguments = {"boundary": boundary} if boundary > 0 else {}
    if cfg_low_noise >= 0:
        arguments["cfg_low_noise"] = cfg_low_noise
    return arguments


class WanMultiGPUSampler:
    """Denoises a Wan 2.1 or 2.2 video latent with the model from this package's loaders."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "The Wan model from 'WanVideo Model Loader (Multi-GPU pack)' or "
                                                  "'WanVideo Multi-GPU Loader'."}),
                "positive": ("CONDITIONING", {"tooltip": "What the video should show: CLIPTextEncode with a CLIPLoader of "
                                                         "type 'wan', or WanImageToVideo's positive output for image-to-video."}),
                "negative": ("CONDITIONING", {"tooltip": "What to steer away from. Ignored (not computed) when cfg is 1."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Video width in pixels (multiple of 16). Ignored when a latent is connected."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Video height in pixels (multiple of 16). Ignored when a latent is connected."}),
                "num_frames": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4,
                                       "tooltip": "Video frames, 4n+1 (81 = 5 s at 16 fps). Ignored when a latent is connected."}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "Denoising steps; 20-50 is typical."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale. 1 skips the negative pass (twice as fast)."}),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.1, "max": 30.0, "step": 0.1,
                                    "tooltip": "Flow-matching timestep shift: larger spends more steps on coarse structure. "
                                               "Wan recommends 5 for 720p and 3 for 480p."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Noise seed; the same seed gives the same video on the same device."}),
                "scheduler": (list(SCHEDULERS), {"default": "unipc",
                                                 "tooltip": "unipc: Wan's default multistep solver; euler: first-order flow "
                                                            "matching; dpm++: DPM-Solver++ 2M."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "Below 1, start from the connected latent (video-to-video): how much of it "
                                                 "is replaced."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Optional: a latent that sets the size (WanImageToVideo's latent, "
                                                 "EmptyHunyuanLatentVideo) or, with denoise below 1, the video to transform."}),
                "boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.999, "step": 0.001,
                                       "tooltip": "Wan 2.2 A14B pairs: the high-noise expert runs while the timestep "
                                                  "is at least boundary x 1000, the low-noise one after. 0: the "
                                                  "model's official value (0.875 t2v, 0.900 i2v)."}),
                "cfg_low_noise": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1,
                                            "tooltip": "Wan 2.2 A14B pairs: the low-noise expert's guidance scale "
                                                       "(cfg guides the high-noise one; official t2v: 4.0 high, 3.0 "
                                                       "low). -1: the same as cfg."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"
    CATEGORY = "WanVideoMultiGPU"
    DESCRIPTION = "Samples a Wan 2.1 or 2.2 video with this package's model; decode the result with ComfyUI's VAEDecode."

    def sample(self, model, positive, negative, width, height, num_frames, steps, cfg, shift, seed, scheduler,
               denoise, latent=None, boundary=0.0, cfg_low_noise=-1.0):
        init_latent = inpaint = None
        experts = expert_arguments(model, boundary, cfg_low_noise)
        fmt = getattr(model.info, "latent_format", WAN21)  # Wan21 (16 channels, 8x) or Wan22 (48, 16x: TI2V-5B)
        down = fmt.stride[1]
        if latent is not None:
            raw = latent["samples"].float()
            if raw.dim() != 5 or raw.shape[1] != fmt.channels:
                raise ValueError(f"The latent has shape {tuple(raw.shape)}; this model ({fmt.name} latent format) "
                                 f"takes [B, {fmt.channels}, T, H/{down}, W/{down}]"
                                 + (": use Wan22ImageToVideoLatent with the wan2.2 VAE." if fmt.channels == 48 else
                                    ": use EmptyHunyuanLatentVideo or WanImageToVideo with the Wan 2.1 VAE."))
            shape = tuple(raw.shape)
            if raw.shape[-1] % 2 or raw.shape[-2] % 2:
                raise ValueError(f"The latent is {raw.shape[-1] * down}x{raw.shape[-2] * down} pixels; this model needs "
                                 f"width and height that are multiples of {fmt.size_multiple}. Resize the video or "
                                 "the empty latent.")
            if "noise_mask" in latent:
                if fmt.channels == 48:  # Wan22ImageToVideoLatent: 0 on the start image's latent frames
                    inpaint = Inpaint(normalize_latents(raw, fmt), latent_mask(latent["noise_mask"], shape))
                else:
                    logger.warning("The latent's noise_mask (inpainting) is not supported and is ignored.")
            if denoise < 1.0:
                if not raw.any():
                    raise ValueError("denoise is below 1 but the connected latent is empty: connect an encoded video "
                                     "(VAEEncode) or set denoise to 1.")
                init_latent = normalize_latents(raw, fmt)
        else:
            check_video_size(width, height, num_frames, fmt)  # the example's and the CLI's rule: no silent rounding
            if denoise < 1.0:
                raise ValueError(f"denoise {denoise} needs a latent to start from: connect one, or set denoise to 1.")
            shape = (1,) + fmt.latent_shape(num_frames, height, width)
        batch, latent_shape = shape[0], shape[2:]
        model_type, text_dim = model.info.model_type, model.info.config.get("text_dim", 4096)
        image_embedding = getattr(model.info, "image_embedding", None)
        pos = comfy_to_conditioning(positive, "positive", model_type, batch, latent_shape, text_dim, image_embedding)
        neg = comfy_to_conditioning(negative, "negative", model_type, batch, latent_shape, text_dim, image_embedding) \
            if cfg != 1.0 or experts.get("cfg_low_noise", 1.0) != 1.0 else None
        noise = make_noise(shape, seed)
        if inpaint is not None:
            experts["inpaint"] = inpaint  # only then: the uniform run's arguments stay as they were
        progress = comfy_host.ProgressReporter(steps, fmt.name)
        # No blanket unload here: the loader put the model under ComfyUI's memory management
        # (comfy_host.manage_memory), so generate makes just the room it needs and brings it back.
        result = model.generate(noise, pos, neg, steps=steps, cfg=cfg, shift=shift, scheduler=scheduler,
                                denoise=denoise, init_latent=init_latent,
                                callback=progress if progress.active else None,
                                check_interrupt=comfy_host.check_interrupt, progress=True, **experts)
        out = dict(latent) if latent is not None else {}
        out["samples"] = denormalize_latents(result.float().cpu(), fmt)
        out.pop("noise_mask", None)
        return (out,)


NODE_CLASS_MAPPINGS = {"WanMultiGPUSampler": WanMultiGPUSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"WanMultiGPUSampler": "WanVideo Sampler (Multi-GPU pack)"}
