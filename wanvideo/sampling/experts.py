"""Two experts, one denoising run (Wan 2.2 A14B): a high-noise and a low-noise denoiser switched at a
boundary timestep.

The rule is the official one (Wan 2.2 wan/text2video.py and image2video.py; diffusers' WanPipeline
with `transformer`, `transformer_2`, `boundary_ratio`): a step whose timestep t satisfies
t >= boundary * 1000 runs the high-noise expert with its guidance scale (official guide_scale[1],
diffusers' `guidance_scale`), every other step the low-noise expert (official guide_scale[0],
diffusers' `guidance_scale_2`). The official t is the int64 cast of sigma * 1000; our loop computes
sigma * 1000 in float64, so `uses_high_noise` truncates it the same way before comparing (for the
integer thresholds 875 and 900 the truncation changes nothing, for any other boundary it keeps the
official choice).

One solver serves the whole run: the loop asks the pair for each step's expert (`before_step`) and
moves the latents and the solver's history to that expert's device, so a multistep solver keeps its
history across the switch. Placements (wanvideo/parallel/experts.py) subclass ExpertPair and use
`before_step` to bring an expert onto its GPU, or prefetch it, ahead of the switch.
"""
import math

import torch

from .schedulers import NUM_TRAIN_TIMESTEPS

__all__ = ["ExpertPair", "HIGH_NOISE", "LOW_NOISE", "EXPERTS", "T2V_BOUNDARY", "I2V_BOUNDARY", "official_boundary",
           "check_boundary", "move_to"]

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"
EXPERTS = (HIGH_NOISE, LOW_NOISE)
T2V_BOUNDARY = 0.875  # Wan 2.2 wan/configs/wan_t2v_A14B.py
I2V_BOUNDARY = 0.900  # Wan 2.2 wan/configs/wan_i2v_A14B.py


def official_boundary(in_dim, out_dim=16):
    """The official boundary of an A14B expert: t2v (in_dim == out_dim, 16) 0.875; i2v (more input
    channels than output: noise, mask and image latents, 36) 0.900."""
    return T2V_BOUNDARY if in_dim <= out_dim else I2V_BOUNDARY


def check_boundary(boundary):
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0 < boundary < 1:
        raise ValueError(f"boundary must be a number in (0, 1) (Wan 2.2: {T2V_BOUNDARY} t2v, {I2V_BOUNDARY} i2v); "
                         f"got {boundary!r}.")
    return float(boundary)


def move_to(device, *items):
    """Tensors, (nested) lists / tuples of tensors and None -> the same on `device`."""
    def move(item):
        if isinstance(item, torch.Tensor):
            return item.to(device)
        if isinstance(item, (list, tuple)):
            return type(item)(move(i) for i in item)
        return item
    return tuple(move(item) for item in items)


class ExpertPair:
    """A high-noise and a low-noise denoiser used as one model by `sample_video`.

    high_noise, low_noise: callables with WanModel.forward's signature (a WanModel, a strategy
      wrapper); both take the same inputs (same in_dim, patch size, text width).
    boundary: in (0, 1); the high-noise expert runs while int(sigma * 1000) >= boundary * 1000.
    The loop reads `patch_size` and `device` (where the run starts) from the high-noise expert and,
    at each step, `prefers_batched_cfg` and the device from that step's expert.
    """

    def __init__(self, high_noise, low_noise, boundary=T2V_BOUNDARY):
        self.experts = {HIGH_NOISE: high_noise, LOW_NOISE: low_noise}
        self.boundary = check_boundary(boundary)
        patches = {name: tuple(getattr(m, "patch_size", (1, 2, 2))) for name, m in self.experts.items()}
        if patches[HIGH_NOISE] != patches[LOW_NOISE]:
            raise ValueError(f"The experts have different patch sizes {patches}; a pair shares its latents.")

    @property
    def patch_size(self):
        return getattr(self.experts[HIGH_NOISE], "patch_size", (1, 2, 2))

    @property
    def text_dim(self):
        return getattr(self.experts[HIGH_NOISE], "text_dim", None)

    @property
    def device(self):
        expert = self.experts[HIGH_NOISE]
        device = getattr(expert, "device", None)
        if device is None and isinstance(expert, torch.nn.Module):
            device = next((p.device for p in expert.parameters() if p.device.type != "meta"), None)
        return device

    def uses_high_noise(self, sigma):
        """True when the step at `sigma` belongs to the high-noise expert (the official int64 timestep rule)."""
        return int(float(sigma) * NUM_TRAIN_TIMESTEPS) >= self.boundary * NUM_TRAIN_TIMESTEPS

    def schedule(self, sigmas):
        """sigmas [steps + 1] -> the expert name of each step (HIGH_NOISE or LOW_NOISE), [steps]."""
        return [HIGH_NOISE if self.uses_high_noise(s) else LOW_NOISE for s in sigmas[:-1].tolist()]

    def switch_step(self, sigmas):
        """The index of the first low-noise step, or None when every step is high-noise."""
        return next((i for i, name in enumerate(self.schedule(sigmas)) if name == LOW_NOISE), None)

    @staticmethod
    def check_guidance(cfg, cfg_low_noise=None):
        """Check cfg_low_noise (None: the same as cfg) and return the scale the loop's input check should
        see: one that is not 1 when either is, so a missing negative branch is reported up front."""
        if cfg_low_noise is None:
            return cfg
        if isinstance(cfg_low_noise, bool) or not isinstance(cfg_low_noise, (int, float)) \
                or not math.isfinite(cfg_low_noise) or cfg_low_noise < 1:
            raise ValueError(f"cfg_low_noise (the low-noise expert's guidance scale) must be a finite number of at "
                             f"least 1, or None for the same as cfg; got {cfg_low_noise!r}.")
        return cfg if cfg != 1 else cfg_low_noise

    def guidance_scales(self, sigmas, cfg, cfg_low_noise=None):
        """Each step's guidance scale: `cfg` on high-noise steps, `cfg_low_noise` (default cfg) on low-noise ones."""
        cfg_low_noise = cfg if cfg_low_noise is None else cfg_low_noise
        return [cfg if name == HIGH_NOISE else cfg_low_noise for name in self.schedule(sigmas)]

    def before_step(self, step_index, sigmas):
        """The denoiser of step `step_index`, ready to run. Called once per step, in order, before the
        step's model calls; placements override it to swap or prefetch experts (sigmas [steps + 1]
        tell them which step switches)."""
        return self.experts[HIGH_NOISE if self.uses_high_noise(sigmas[step_index]) else LOW_NOISE]

    def describe_schedule(self, sigmas):
        """'high-noise steps 0-25 (t 999..877), low-noise steps 26-39 (t 865..0)' for logs."""
        names, parts = self.schedule(sigmas), []
        for name in EXPERTS:
            steps = [i for i, n in enumerate(names) if n == name]
            if steps:
                t = [int(sigmas[i].item() * NUM_TRAIN_TIMESTEPS) for i in (steps[0], steps[-1])]
                parts.append(f"{name.replace('_', '-')} steps {steps[0]}-{steps[-1]} (t {t[0]}..{t[1]})")
        return ", ".join(parts)
