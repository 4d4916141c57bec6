"""The Wan VAE latent spaces: per-channel normalisation, sizes, and a cheap latent -> RGB preview.

ComfyUI's LATENT holds raw VAE latents; the diffusion model works on normalised ones,
(raw - mean) * scale_factor / std per channel, as ComfyUI's latent formats `Wan21` (16 channels,
the Wan 2.1 VAE, also used by the Wan 2.2 A14B experts) and `Wan22` (48 channels, the Wan 2.2 VAE of
TI2V-5B, 16x spatial compression) compute it. The constants are those of the official VAEs.
The module-level Wan 2.1 names (LATENT_CHANNELS, LATENTS_MEAN, ...) stay for existing callers.
"""
from dataclasses import dataclass

import torch

LATENT_CHANNELS = 16
TEMPORAL_COMPRESSION = 4    # 4n + 1 video frames -> n + 1 latent frames
SPATIAL_COMPRESSION = 8

LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
# Linear map from the 16 normalised channels to RGB in [-1, 1], for previews.
LATENT_RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861]]
LATENT_RGB_BIAS = [-0.1835, -0.0868, -0.3360]

# The Wan 2.2 VAE (official wan/modules/vae2_2.py; ComfyUI comfy/latent_formats.py Wan22)
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]
WAN22_LATENT_RGB_FACTORS = [
    [0.0119, 0.0103, 0.0046], [-0.1062, -0.0504, 0.0165], [0.0140, 0.0409, 0.0491], [-0.0813, -0.0677, 0.0607],
    [0.0656, 0.0851, 0.0808], [0.0264, 0.0463, 0.0912], [0.0295, 0.0326, 0.0590], [-0.0244, -0.0270, 0.0025],
    [0.0443, -0.0102, 0.0288], [-0.0465, -0.0090, -0.0205], [0.0359, 0.0236, 0.0082], [-0.0776, 0.0854, 0.1048],
    [0.0564, 0.0264, 0.0561], [0.0006, 0.0594, 0.0418], [-0.0319, -0.0542, -0.0637], [-0.0268, 0.0024, 0.0260],
    [0.0539, 0.0265, 0.0358], [-0.0359, -0.0312, -0.0287], [-0.0285, -0.1032, -0.1237], [0.1041, 0.0537, 0.0622],
    [-0.0086, -0.0374, -0.0051], [0.0390, 0.0670, 0.2863], [0.0069, 0.0144, 0.0082], [0.0006, -0.0167, 0.0079],
    [0.0313, -0.0574, -0.0232], [-0.1454, -0.0902, -0.0481], [0.0714, 0.0827, 0.0447], [-0.0304, -0.0574, -0.0196],
    [0.0401, 0.0384, 0.0204], [-0.0758, -0.0297, -0.0014], [0.0568, 0.1307, 0.1372], [-0.0055, -0.0310, -0.0380],
    [0.0239, -0.0305, 0.0325], [-0.0663, -0.0673, -0.0140], [-0.0416, -0.0047, -0.0023], [0.0166, 0.0112, -0.0093],
    [-0.0211, 0.0011, 0.0331], [0.1833, 0.1466, 0.2250], [-0.0368, 0.0370, 0.0295], [-0.3441, -0.3543, -0.2008],
    [-0.0479, -0.0489, -0.0420], [-0.0660, -0.0153, 0.0800], [-0.0101, 0.0068, 0.0156], [-0.0690, -0.0452, -0.0927],
    [-0.0145, 0.0041, 0.0015], [0.0421, 0.0451, 0.0373], [0.0504, -0.0483, -0.0356], [-0.0837, 0.0168, 0.0055]]
WAN22_LATENT_RGB_BIAS = [0.0317, -0.0878, -0.1388]


@dataclass(frozen=True)
class LatentFormat:
    """One VAE latent space, named like ComfyUI's latent format class that handles it."""
    name: str             # 'Wan21' or 'Wan22' (comfy.latent_formats)
    channels: int         # 16 or 48
    stride: tuple         # video frames, pixels down, pixels across per latent element (the official vae_stride)
    mean: tuple
    std: tuple
    rgb_factors: tuple    # [channels][3]: normalised latents -> RGB in [-1, 1], for previews
    rgb_bias: tuple
    scale_factor: float = 1.0

    @property
    def size_multiple(self):
        """Video width and height must be multiples of this: the VAE's stride times the model's 2x2 patches."""
        return self.stride[1] * 2

    def latent_shape(self, num_frames, height, width):
        """(channels, latent frames, latent height, latent width) of a num_frames x height x width video
        (4n + 1 frames: the VAE keeps the first frame and packs 4 frames per latent frame after it)."""
        frames, down, across = self.stride
        return self.channels, (num_frames - 1) // frames + 1, height // down, width // across


WAN21 = LatentFormat("Wan21", LATENT_CHANNELS, (TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION, SPATIAL_COMPRESSION),
                     tuple(LATENTS_MEAN), tuple(LATENTS_STD), tuple(map(tuple, LATENT_RGB_FACTORS)),
                     tuple(LATENT_RGB_BIAS))
WAN22 = LatentFormat("Wan22", 48, (4, 16, 16), tuple(WAN22_LATENTS_MEAN), tuple(WAN22_LATENTS_STD),
                     tuple(map(tuple, WAN22_LATENT_RGB_FACTORS)), tuple(WAN22_LATENT_RGB_BIAS))
LATENT_FORMATS = {WAN21.name: WAN21, WAN22.name: WAN22}


def latent_format_for(spec=None):
    """A LatentFormat from a LatentFormat, a channel count (16 or 48), a ComfyUI name ('Wan21', 'Wan22')
    or None (Wan 2.1)."""
    if isinstance(spec, LatentFormat):
        return spec
    if spec is None:
        return WAN21
    found = {fmt.channels: fmt for fmt in LATENT_FORMATS.values()}.get(spec) or LATENT_FORMATS.get(spec)
    if found is None:
        raise ValueError(f"No Wan latent format for {spec!r}: give a channel count (16 for the Wan 2.1 VAE, 48 for "
                         "the Wan 2.2 VAE) or a name ('Wan21', 'Wan22').")
    return found


def _format_of(latents, latent_format, channel_dim):
    """The format given, else the one of the latents' channel count; checked against the latents."""
    fmt = latent_format_for(latents.shape[channel_dim] if latent_format is None else latent_format)
    if latents.shape[channel_dim] != fmt.channels:
        raise ValueError(f"Latents of shape {tuple(latents.shape)} have {latents.shape[channel_dim]} channels; the "
                         f"{fmt.name} latent format has {fmt.channels}.")
    return fmt


def _per_channel(values, like):
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)


def normalize_latents(raw, latent_format=None):
    """Raw VAE latents [B, C, T, H, W] -> the model's space (ComfyUI's process_in). latent_format: a
    LatentFormat, 16 / 48 or 'Wan21' / 'Wan22'; by default the one of the latents' C (16 or 48)."""
    fmt = _format_of(raw, latent_format, 1)
    return (raw - _per_channel(fmt.mean, raw)) * fmt.scale_factor / _per_channel(fmt.std, raw)


def denormalize_latents(latents, latent_format=None):
    """The model's latents [B, C, T, H, W] -> raw VAE latents (what VAEDecode takes; process_out)."""
    fmt = _format_of(latents, latent_format, 1)
    return latents * _per_channel(fmt.std, latents) / fmt.scale_factor + _per_channel(fmt.mean, latents)


def latent_frame_count(video_frames, latent_format=None):
    """Latent frames for a video of `video_frames` frames (4n + 1 expected; 4x for both Wan VAEs)."""
    return (video_frames - 1) // latent_format_for(latent_format).stride[0] + 1


VIDEO_SIZE_MULTIPLE = SPATIAL_COMPRESSION * 2   # the VAE's 8x in height and width times the model's 2x2 patches


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _nearest(value, step, offset=0):
    """' (a or b are near)': the valid values around `value` on the grid offset + k * step."""
    low = (value - offset) // step * step + offset
    return f" ({low} or {low + step} are near)" if low >= 1 else f" ({low + step} is near)"


def check_video_size(width, height, num_frames, latent_format=None):
    """Raise ValueError naming the value when a video size does not map onto whole latent patches:
    width and height positive multiples of the format's size_multiple (16 pixels for Wan 2.1's VAE,
    32 for Wan 2.2's), num_frames 4n + 1 (1, 5, ..., 81). The one pixel-size check of the example,
    the CLI, the benchmark and the sampler node. latent_format: as latent_format_for (None: Wan 2.1)."""
    multiple = latent_format_for(latent_format).size_multiple
    for name, value in (("width", width), ("height", height)):
        if not _is_count(value) or value % multiple:
            near = _nearest(value, multiple) if _is_count(value) else ""
            example = "64 or 832" if multiple == VIDEO_SIZE_MULTIPLE else "704 or 1280"
            raise ValueError(f"{name}={value!r} is not valid: give a positive multiple of {multiple} "
                             f"pixels, such as {example}{near}.")
    if not _is_count(num_frames) or (num_frames - 1) % TEMPORAL_COMPRESSION:
        near = _nearest(num_frames, TEMPORAL_COMPRESSION, 1) if _is_count(num_frames) else ""
        raise ValueError(f"num_frames={num_frames!r} is not valid: give 4n + 1 frames (1, 5, 9, ..., 81){near}; "
                         "the VAE keeps the first frame and packs 4 frames per latent frame after it.")


def latents_to_rgb(latents, latent_format=None):
    """Normalised latents [C, T, H, W] (16 or 48 channels) -> uint8 frames [T, H, W, 3] (approximate
    colours, at latent size: 1/8 or 1/16 of the video's)."""
    fmt = _format_of(latents, latent_format, 0)
    factors = torch.tensor(fmt.rgb_factors, dtype=torch.float32)
    rgb = torch.einsum("cthw,cr->thwr", latents.float().cpu(), factors) + torch.tensor(fmt.rgb_bias)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_preview_animation(latents, path, fps=16, scale=4, latent_format=None):
    """Write normalised latents [C, T, H, W] as an animated image (GIF or WebP, by suffix)."""
    from PIL import Image
    frames = [Image.fromarray(frame.numpy()).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
              for frame in latents_to_rgb(latents, latent_format)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


# ComfyUI's .latent file (nodes.py SaveLatent / LoadLatent): a safetensors file whose 'latent_tensor' is
# the LATENT's samples as the graph holds them (for Wan: raw VAE latents). LoadLatent multiplies by
# 1 / 0.18215 (the old SD1 scale) unless the empty 'latent_format_version_0' marker is present.
COMFY_LATENT_KEY = "latent_tensor"
COMFY_LATENT_MARKER = "latent_format_version_0"


def save_comfy_latent(path, latents):
    """Write model-space latents [B, 16 or 48, T, H, W] (the Wan 2.1 or Wan 2.2 VAE's space, told by the
    channels) as a ComfyUI .latent file that LoadLatent opens (put it in ComfyUI's input folder): raw VAE
    latents in float32, as SaveLatent stores them, so LoadLatent -> VAEDecode (with that VAE) gives the
    video. Returns `path`."""
    from safetensors.torch import save_file
    channels = {fmt.channels for fmt in LATENT_FORMATS.values()}
    if latents.dim() != 5 or latents.shape[1] not in channels:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; a Wan video latent is [B, {LATENT_CHANNELS}, "
                         "T, H, W] (Wan 2.1 VAE) or [B, 48, T, H, W] (Wan 2.2 VAE).")
    fmt = latent_format_for(latents.shape[1])
    raw = denormalize_latents(latents.detach().float().cpu(), fmt).contiguous()
    save_file({COMFY_LATENT_KEY: raw, COMFY_LATENT_MARKER: torch.tensor([])}, str(path),
              metadata={"format": f"ComfyUI LATENT (raw {fmt.name} VAE latents)"})
    return path
