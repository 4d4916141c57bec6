"""The Wan 2.1 VAE latent space: per-channel normalisation and a cheap latent -> RGB preview.

ComfyUI's LATENT holds raw VAE latents; the diffusion model works on normalised ones,
(raw - mean) / std per channel. The constants are those of the Wan 2.1 VAE.
"""
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


def _per_channel(values, like):
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)


def normalize_latents(raw):
    """Raw VAE latents [B, 16, T, H, W] -> the model's space."""
    return (raw - _per_channel(LATENTS_MEAN, raw)) / _per_channel(LATENTS_STD, raw)


def denormalize_latents(latents):
    """The model's latents [B, 16, T, H, W] -> raw VAE latents (what VAEDecode takes)."""
    return latents * _per_channel(LATENTS_STD, latents) + _per_channel(LATENTS_MEAN, latents)


def latent_frame_count(video_frames):
    """Latent frames for a video of `video_frames` frames (4n + 1 expected)."""
    return (video_frames - 1) // TEMPORAL_COMPRESSION + 1


def latents_to_rgb(latents):
    """Normalised latents [16, T, H, W] -> uint8 frames [T, H, W, 3] (approximate colours, 1/8 size)."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = torch.einsum("cthw,cr->thwr", latents.float().cpu(), factors) + torch.tensor(LATENT_RGB_BIAS)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_preview_animation(latents, path, fps=16, scale=4):
    """Write normalised latents [16, T, H, W] as an animated image (GIF or WebP, by suffix)."""
    from PIL import Image
    frames = [Image.fromarray(frame.numpy()).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
              for frame in latents_to_rgb(latents)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path
