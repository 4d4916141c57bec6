"""CFG parallelism: the conditional and unconditional branches on two groups of ranks.

`GuidedVelocityModel` wraps a (possibly sequence-parallel) model in a callable with the official
Wan 2.1 forward signature that returns the *guided* velocity uncond + cfg * (cond - uncond). With
CFG degree 2, CFG group 0 evaluates the positive branch it is called with and CFG group 1 the
negative branch it holds; one all-gather across the CFG pair gives every rank both velocities.
With CFG degree 1 it evaluates both branches in turn on the same ranks.

The denoising loop runs it as an unguided model (`sample_video(wrapper, ..., negative=None, cfg=1)`),
so the loop needs no knowledge of how the branches are placed.
"""
import logging

import torch

from .attention import all_gather_along

logger = logging.getLogger(__name__)


class GuidedVelocityModel:
    """model(x, t, context, seq_len, clip_fea, y) -> guided velocities, branches placed by `groups`.

    model: the WanModel of this rank (sequence parallel already applied where the SP size > 1);
    negative: the negative Conditioning (context: B text embeddings [L, 4096], clip_fea
      [B, 257 or 514, 1280] or None, y [B, 20, F, H, W] or None; missing clip_fea / y take the
      positive's, as in sample_video); cfg: the guidance scale. At cfg == 1 the negative branch is
      not evaluated and every CFG group computes the positive branch alone.
    """

    def __init__(self, model, groups, negative, cfg):
        if cfg != 1 and negative is None:
            raise ValueError(f"cfg={cfg} needs a negative Conditioning; pass one, or set cfg to 1.0.")
        self.model, self.groups, self.negative, self.cfg = model, groups, negative, cfg

    @property
    def device(self):
        return self.model.patch_embedding.weight.device

    @property
    def patch_size(self):
        return self.model.patch_size

    def _negative_branch(self, clip_fea, y):
        """The negative's (context, clip_fea, y) on the model's device; positive's image inputs as fallback."""
        device = self.device
        context = [c.to(device) for c in self.negative.context]
        neg_clip = clip_fea if self.negative.clip_fea is None else self.negative.clip_fea.to(device)
        neg_y = y if self.negative.y is None else list(self.negative.y.to(device, torch.float32))
        return context, neg_clip, neg_y

    def __call__(self, x, t, context, seq_len=None, clip_fea=None, y=None):
        """x: list of B [C, F, H, W]; t [B]; context: list of B [L, 4096] (positive) -> list of B [16, F, H, W]."""
        if self.cfg == 1:
            if self.groups.degrees.cfg == 2 and splits_in_two(x):
                return self._halves(x, t, context, seq_len, clip_fea, y)
            return self.model(x, t, context, seq_len=seq_len, clip_fea=clip_fea, y=y)
        neg_context, neg_clip, neg_y = self._negative_branch(clip_fea, y)
        if self.groups.degrees.cfg == 1:
            cond = self.model(x, t, context, seq_len=seq_len, clip_fea=clip_fea, y=y)
            uncond = self.model(x, t, neg_context, seq_len=seq_len, clip_fea=neg_clip, y=neg_y)
        else:
            if self.groups.cfg_rank == 0:
                mine = self.model(x, t, context, seq_len=seq_len, clip_fea=clip_fea, y=y)
            else:
                mine = self.model(x, t, neg_context, seq_len=seq_len, clip_fea=neg_clip, y=neg_y)
            cond, uncond = self._exchange(mine)
        return [u + self.cfg * (c - u) for c, u in zip(cond, uncond)]

    def _exchange(self, mine):
        """This CFG group's outputs (a list) -> (CFG group 0's, CFG group 1's), on every rank. One flat
        exchange serves batches of videos of different sizes too (both groups' lists alike)."""
        both = all_gather_along(torch.cat([v.flatten() for v in mine])[None], 0, self.groups.cfg_group, 2)
        sizes = [v.numel() for v in mine]
        return tuple([part.view_as(v) for part, v in zip(branch.split(sizes), mine)] for branch in both)

    def _halves(self, x, t, context, seq_len, clip_fea, y):
        """cfg 1 with a batch of 2n videos of one size (two videos, or the cond and uncond halves an
        expert pair's loop sends in one request): CFG group r runs items [r n, (r + 1) n) and the
        groups swap their halves, instead of both running all 2n."""
        n, r = len(x) // 2, self.groups.cfg_rank
        part = slice(r * n, (r + 1) * n)
        mine = self.model(x[part], t[part], context[part], seq_len=seq_len,
                          clip_fea=None if clip_fea is None else clip_fea[part], y=None if y is None else y[part])
        first, second = self._exchange(mine)
        return first + second


def splits_in_two(x):
    """Whether a batch (list of [C, F, H, W]) is 2n videos of one size: what CFG groups can share at cfg 1."""
    return len(x) >= 2 and len(x) % 2 == 0 and all(v.shape == x[0].shape for v in x)
