"""The position and time embeddings of Wan (2.1 and 2.2 share them), and the CLIP image projection.

Sinusoidal timestep embedding, 3-axis RoPE tables for a (F, H, W) token grid, and `MLPProj`
(Wan 2.1 i2v / flf2v only: the Wan 2.2 models take no CLIP image tokens).
"""
import functools

import torch
import torch.nn as nn

CLIP_DIM = 1280             # CLIP ViT-H/14 penultimate hidden size, the image-token width
CLIP_TOKENS = 257           # tokens per CLIP image (256 patches + class token)


def sinusoidal_embedding_1d(dim, position):
    """[N] positions -> [N, dim] embedding, cosines first, computed in float64 as Wan does."""
    half = dim // 2
    position = position.to(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half, dtype=torch.float64,
                                                                      device=position.device).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_params(max_seq_len, dim, theta=10000):
    """Rotation angles [max_seq_len, dim // 2] (float64) for one RoPE axis of `dim` channels."""
    assert dim % 2 == 0
    return torch.outer(torch.arange(max_seq_len, dtype=torch.float64),
                       1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)))


def rope_frequencies(head_dim, grid_size, device, max_seq_len=1024):
    """Rotations [F*H*W, 1, head_dim // 2, 2] (cos, sin; float32) for a (F, H, W) token grid.

    The head dimension is split between time, height and width as in Wan 2.1 and 2.2:
    head_dim - 4 * (head_dim // 6) channels for time, 2 * (head_dim // 6) each for height and width.
    """
    return _rope_table(head_dim, tuple(grid_size), max_seq_len).to(device)


@functools.lru_cache(maxsize=8)
def _rope_table(head_dim, grid_size, max_seq_len):
    """rope_frequencies on the CPU, computed once per grid (float64 work: ~20 ms at 720p)."""
    f, h, w = grid_size
    axis_dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    angles_t, angles_h, angles_w = (rope_params(max_seq_len, d) for d in axis_dims)
    if max(f, h, w) > max_seq_len:
        raise ValueError(f"Token grid {grid_size} exceeds the RoPE table of {max_seq_len} positions per axis.")
    angles = torch.cat([
        angles_t[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        angles_h[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        angles_w[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).to(torch.float32)


class MLPProj(nn.Module):
    """CLIP image tokens [B, 257 (x2 for flf2v), 1280] -> [B, same, dim]."""

    def __init__(self, in_dim, out_dim, flf_pos_emb=False):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))
        if flf_pos_emb:  # first and last frame: 2 x 257 tokens, each with a learned position
            self.emb_pos = nn.Parameter(torch.zeros(1, 2 * CLIP_TOKENS, in_dim))

    def forward(self, image_embeds):
        if hasattr(self, "emb_pos"):
            batch, tokens, width = image_embeds.shape
            image_embeds = image_embeds.reshape(-1, 2 * tokens, width) if tokens != 2 * CLIP_TOKENS else image_embeds
            image_embeds = image_embeds + self.emb_pos.to(image_embeds.dtype)
        return self.proj(image_embeds)
