"""Sampling core: sigma schedules and solvers against diffusers and closed-form flows; the loop with a
recording fake model; end to end with the tiny real model."""
import math

import pytest
import torch
import torch.nn as nn

from wanvideo.sampling import (SCHEDULERS, Conditioning, FlowEulerScheduler, FlowUniPCScheduler, flow_sigmas,
                               make_noise, make_scheduler, sample_video)
from wanvideo.sampling.loop import check_inputs

diffusers = pytest.importorskip("diffusers")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def shifted(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def diffusers_base_grid(steps):
    """The unshifted grid that diffusers' schedulers shift themselves when given `sigmas=`."""
    import numpy as np
    return np.linspace(1 - 1 / 1000, 0, steps + 1)[:-1]


# --- schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps,shift", [(4, 5.0), (10, 3.0), (30, 8.0), (50, 5.0)])
def test_flow_sigmas_equal_wan_and_diffusers_grids(steps, shift):
    ours = flow_sigmas(steps, shift)
    assert ours.dtype == torch.float64 and ours.shape == (steps + 1,) and ours[-1] == 0
    assert (ours[:-1] > ours[1:]).all() and ours[0] < 1
    # diffusers builds Wan's grid itself in the DPM-Solver scheduler (stored in float32)
    dpm = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                flow_shift=shift)
    dpm.set_timesteps(steps)
    torch.testing.assert_close(ours, dpm.sigmas.double(), rtol=1e-6, atol=1e-7)
    # FlowMatchEulerDiscreteScheduler(shift) applies the same shift to the same grid and appends 0
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    euler.set_timesteps(sigmas=diffusers_base_grid(steps))
    torch.testing.assert_close(ours, euler.sigmas.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(make_scheduler("euler", ours).timesteps, euler.timesteps.double(), rtol=1e-6, atol=1e-4)
    # diffusers' UniPC default grid starts 1/1000 higher before the shift: a difference under shift/1000
    unipc = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    unipc.set_timesteps(steps)
    assert (ours - unipc.sigmas.double()).abs().max() <= shift / 1000


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    steps, shift, denoise = 10, 5.0, 0.4
    sigmas = flow_sigmas(steps, shift, denoise)
    total = 25  # int(10 / 0.4)
    expected = [shifted((1 - 1 / 1000) * (1 - k / total), shift) for k in range(total - steps, total)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert sigmas[0] < flow_sigmas(steps, shift)[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0, shift=5.0), "steps"), (dict(steps=2.5, shift=5.0), "steps"),
    (dict(steps=10, shift=0.0), "shift"), (dict(steps=10, shift=5.0, denoise=0.0), "denoise"),
    (dict(steps=10, shift=5.0, denoise=1.5), "denoise")])
def test_flow_sigmas_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow_sigmas(**kwargs)


def test_scheduler_registry_and_errors():
    assert set(SCHEDULERS) == {"euler", "unipc", "dpm++"}
    with pytest.raises(ValueError, match=r"'heun'.*'euler', 'unipc', 'dpm\+\+'"):
        make_scheduler("heun", flow_sigmas(4, 5.0))
    with pytest.raises(ValueError, match="decrease"):
        FlowEulerScheduler(torch.tensor([0.5, 0.8, 0.0]))
    solver = make_scheduler("unipc", flow_sigmas(4, 5.0))
    x = torch.zeros(3)
    solver.step(x, x, 0)
    with pytest.raises(ValueError, match="step_index=2; expected 1"):
        solver.step(x, x, 2)


# --- solvers against diffusers -----------------------------------------------------------------

def velocity_field(x, sigma):
    """A fixed smooth velocity field, the same function for both implementations."""
    return 0.8 * x + 0.3 * torch.sin(3 * x) - 0.5 * sigma


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_euler_steps_equal_diffusers(dtype, tol):
    steps, shift = 8, 5.0
    sigmas = flow_sigmas(steps, shift)
    ours = make_scheduler("euler", sigmas)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=diffusers_base_grid(steps))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, 4, generator=gen, dtype=torch.float64).to(dtype)
    for i in range(steps):
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
        expected = ref.step(v, ref.timesteps[i], x).prev_sample
        x = ours.step(v, x, i)
        assert x.dtype == dtype and rel_err(x, expected) <= tol


def run_pair(ours, ref, steps, dtype, sigmas):
    """Drive both solvers with velocity_field from the same start; yield their states after each step."""
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    y = x.clone()
    for i in range(steps):
        x = ours.step(velocity_field(x, sigmas[i].item()), x, i)
        y = ref.step(velocity_field(y, sigmas[i].item()), ref.timesteps[i], y).prev_sample
        yield x, y


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps,shift", [(6, 5.0), (12, 3.0)])
def test_unipc_states_equal_diffusers(order, steps, shift):
    sigmas = flow_sigmas(steps, shift)
    kwargs = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, solver_order=order)
    # the algorithm, with identical float64 sigmas on both sides
    ref = diffusers.UniPCMultistepScheduler(**kwargs)
    ref.set_timesteps(sigmas=diffusers_base_grid(steps))
    ref.sigmas = sigmas.clone()
    for x, y in run_pair(FlowUniPCScheduler(sigmas, order=order), ref, steps, torch.float64, sigmas):
        assert rel_err(x, y) <= 1e-10
    # as used: float32 states, diffusers with its own float32 sigmas
    ref = diffusers.UniPCMultistepScheduler(**kwargs)
    ref.set_timesteps(sigmas=diffusers_base_grid(steps))
    for x, y in run_pair(FlowUniPCScheduler(sigmas, order=order), ref, steps, torch.float32, sigmas):
        assert rel_err(x, y) <= 1e-5


def test_unipc_bh1_equals_diffusers_before_the_last_step():
    """diffusers' bh1 variant ends in NaN (B(h) = -h is infinite at sigma 0); ours returns the x0 there."""
    steps, shift = 6, 5.0
    sigmas = flow_sigmas(steps, shift)
    ref = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            flow_shift=shift, solver_type="bh1")
    ref.set_timesteps(sigmas=diffusers_base_grid(steps))
    ref.sigmas = sigmas.clone()
    states = list(run_pair(FlowUniPCScheduler(sigmas, variant="bh1"), ref, steps, torch.float64, sigmas))
    for x, y in states[:-1]:
        assert rel_err(x, y) <= 1e-10
    assert torch.isfinite(states[-1][0]).all()


def test_dpmpp_2m_states_equal_diffusers():
    steps, shift = 10, 5.0
    sigmas = flow_sigmas(steps, shift)
    ref = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                flow_shift=shift, solver_order=2)
    ref.set_timesteps(steps)
    for x, y in run_pair(make_scheduler("dpm++", sigmas), ref, steps, torch.float32, sigmas):
        assert rel_err(x, y) <= 1e-5


# --- solvers against closed-form flows ----------------------------------------------------------

def integrate(name, sigmas, velocity, x):
    solver = make_scheduler(name, sigmas)
    for i in range(len(sigmas) - 1):
        x = solver.step(velocity(x, sigmas[i].item()), x, i)
    return x


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_single_point_data_is_reached_exactly(name):
    """Data = one point x0: the exact velocity is (x - x0) / sigma, and every solver lands on x0."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    sigmas = flow_sigmas(5, 5.0)
    start = sigmas[0] * noise + (1 - sigmas[0]) * x0
    end = integrate(name, sigmas, lambda x, s: (x - x0) / s, start)
    assert rel_err(end, x0) <= 1e-12


def test_gaussian_data_flow_map():
    """Data ~ N(mu, s^2) per element. The marginal at sigma is N((1-sigma) mu, (1-sigma)^2 s^2 + sigma^2),
    the exact velocity is (x - E[x0 | x]) / sigma, and the flow keeps each sample's standard score, so
    x(0) = mu + s * (x(sigma0) - (1-sigma0) mu) / std(sigma0)."""
    mu, s = 0.7, 0.5

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        x0_mean = mu + (1 - sigma) * s**2 / var * (x - (1 - sigma) * mu)
        return (x - x0_mean) / sigma

    start_noise = torch.randn(4096, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    errors = {}
    for steps in (8, 32):
        # shift 1 keeps the last, first-order step (sigma 1/steps -> 0) short for both step counts
        sigmas = flow_sigmas(steps, 1.0)
        sigma0 = sigmas[0].item()
        start = sigma0 * start_noise  # any start works; the map is applied to it
        exact = mu + s * (start - (1 - sigma0) * mu) / math.sqrt((1 - sigma0) ** 2 * s**2 + sigma0**2)
        for name in SCHEDULERS:
            errors[name, steps] = rel_err(integrate(name, sigmas, velocity, start), exact)
    assert errors["unipc", 8] < errors["euler", 8] / 5 and errors["dpm++", 8] < errors["euler", 8] / 3
    assert errors["euler", 32] < errors["euler", 8] / 3      # first order: about 4x smaller
    assert errors["unipc", 32] < errors["unipc", 8] / 2
    assert errors["unipc", 32] < 0.01


# --- the loop, with a recording fake model ------------------------------------------------------

class FakeWan(nn.Module):
    """Deterministic, per-item, with the official signature; records every call."""

    patch_size = (1, 2, 2)

    def __init__(self, in_dim=16, text_dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Conv3d(in_dim, 16, 1)
        self.text = nn.Linear(text_dim, 16)
        self.calls = []

    def forward(self, x, t, context, seq_len=None, clip_fea=None, y=None):
        self.calls.append(dict(x=[u.clone() for u in x], t=t.clone(), context=list(context), seq_len=seq_len,
                               clip_fea=clip_fea, y=y))
        out = []
        for i, u in enumerate(x):
            if y is not None:
                u = torch.cat([u, y[i]])
            v = self.mix(u[None])[0] + self.text(context[i].mean(0))[:, None, None, None] * (1 + t[i] / 1000)
            if clip_fea is not None:
                v = v + clip_fea[i].mean()
            out.append(v.float())
        return out


def make_conds(batch, seed=5, text_dim=8):
    gen = torch.Generator().manual_seed(seed)
    pos = Conditioning(context=[torch.randn(6 + i, text_dim, generator=gen) for i in range(batch)])
    neg = Conditioning(context=[torch.randn(4, text_dim, generator=gen) for _ in range(batch)])
    return pos, neg


SHAPE = (2, 16, 3, 4, 6)


def test_cfg_one_makes_no_negative_call():
    model, (pos, neg) = FakeWan(), make_conds(2)
    sample_video(model, make_noise(SHAPE, 1), pos, neg, steps=4, cfg=1.0, progress=False)
    assert len(model.calls) == 4
    for call in model.calls:
        assert len(call["x"]) == 2 and all(c is p or torch.equal(c, p) for c, p in zip(call["context"], pos.context))
        assert call["seq_len"] == 3 * 2 * 3


def test_batched_cfg_packs_positive_first_and_equals_two_calls():
    pos, neg = make_conds(2)
    noise = make_noise(SHAPE, 2)
    batched = FakeWan()
    out_batched = sample_video(batched, noise, pos, neg, steps=3, cfg=4.0, batch_cfg=True, progress=False)
    assert len(batched.calls) == 3
    for call in batched.calls:
        assert len(call["x"]) == 4 and call["t"].shape == (4,)
        assert all(torch.equal(c, e) for c, e in zip(call["context"], pos.context + neg.context))
        assert torch.equal(call["x"][0], call["x"][2]) and torch.equal(call["x"][1], call["x"][3])
    split = FakeWan()
    out_split = sample_video(split, noise, pos, neg, steps=3, cfg=4.0, batch_cfg=False, progress=False)
    assert len(split.calls) == 6 and all(len(call["x"]) == 2 for call in split.calls)
    assert rel_err(out_batched, out_split) <= 1e-6
    preferring = FakeWan()
    preferring.prefers_batched_cfg = True
    sample_video(preferring, noise, pos, neg, steps=2, cfg=4.0, progress=False)
    assert [len(call["x"]) for call in preferring.calls] == [4, 4]


def test_guided_velocity_formula_one_step():
    model, (pos, neg) = FakeWan(), make_conds(2)
    noise, cfg, shift = make_noise(SHAPE, 3), 3.5, 5.0
    out = sample_video(model, noise, pos, neg, steps=1, cfg=cfg, shift=shift, scheduler="euler", progress=False)
    sigma0 = shifted(1 - 1 / 1000, shift)
    t = torch.full((2,), sigma0 * 1000)
    cond = torch.stack(FakeWan()(list(noise), t, pos.context))
    uncond = torch.stack(FakeWan()(list(noise), t, neg.context))
    expected = noise - sigma0 * (uncond + cfg * (cond - uncond))  # one Euler step from sigma0 to 0
    assert rel_err(out, expected) <= 1e-6
    torch.testing.assert_close(model.calls[0]["t"], t)


def test_make_noise_is_deterministic_per_seed():
    a, b, c = make_noise(SHAPE, 42), make_noise(SHAPE, 42), make_noise(SHAPE, 43)
    assert a.dtype == torch.float32 and a.shape == SHAPE
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1) < 0.1


def test_denoise_starts_from_the_noised_input():
    model, (pos, _) = FakeWan(), make_conds(2)
    noise, init = make_noise(SHAPE, 6), make_noise(SHAPE, 7) * 0.5 + 1
    sample_video(model, noise, pos, steps=4, cfg=1.0, shift=3.0, denoise=0.5, init_latent=init, progress=False)
    sigma0 = shifted((1 - 1 / 1000) * 0.5, 3.0)  # step 4 of 8
    first_x = torch.stack(model.calls[0]["x"])
    assert rel_err(first_x, sigma0 * noise + (1 - sigma0) * init) <= 1e-6
    torch.testing.assert_close(model.calls[0]["t"], torch.full((2,), sigma0 * 1000))
    with pytest.raises(ValueError, match="denoise=0.5 needs init_latent"):
        sample_video(model, noise, pos, steps=4, cfg=1.0, denoise=0.5, progress=False)


def test_interrupt_stops_before_the_next_model_call():
    model, (pos, neg) = FakeWan(), make_conds(2)
    checks = []

    def check_interrupt():
        checks.append(1)
        if len(checks) == 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        sample_video(model, make_noise(SHAPE, 1), pos, neg, steps=6, cfg=2.0, check_interrupt=check_interrupt,
                     progress=False)
    assert len(model.calls) == 4  # two steps of cond + uncond


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_callback_each_step_and_final_x0(scheduler):
    model, (pos, neg) = FakeWan(), make_conds(2)
    seen = []
    out = sample_video(model, make_noise(SHAPE, 1), pos, neg, steps=5, cfg=2.0, scheduler=scheduler,
                       callback=lambda i, n, x0: seen.append((i, n, x0)), progress=False)
    assert [(i, n) for i, n, _ in seen] == [(i, 5) for i in range(5)]
    assert all(x0.shape == SHAPE for _, _, x0 in seen)
    assert rel_err(out, seen[-1][2]) <= 1e-6  # the last step lands on sigma 0: the state is the x0 prediction


def test_image_conditioning_reaches_the_model_and_negative_inherits_it():
    model = FakeWan(in_dim=36)
    pos, neg = make_conds(2)
    pos.clip_fea = torch.randn(2, 257, 1280)
    pos.y = torch.randn(2, 20, *SHAPE[2:])
    sample_video(model, make_noise(SHAPE, 1), pos, neg, steps=2, cfg=3.0, batch_cfg=True, progress=False)
    call = model.calls[0]
    assert torch.equal(call["clip_fea"], torch.cat([pos.clip_fea, pos.clip_fea]))
    assert len(call["y"]) == 4 and all(torch.equal(call["y"][k], pos.y[k % 2]) for k in range(4))


def test_loop_rejects_bad_input():
    model, (pos, neg) = FakeWan(), make_conds(2)
    noise = make_noise(SHAPE, 1)
    with pytest.raises(ValueError, match="cfg=5.0 needs a negative"):
        sample_video(model, noise, pos, steps=2, progress=False)
    with pytest.raises(ValueError, match="3 text embeddings for a batch of 2"):
        sample_video(model, noise, make_conds(3)[0], cfg=1.0, steps=2, progress=False)
    with pytest.raises(ValueError, match="Unknown scheduler 'ddim'"):
        sample_video(model, noise, pos, neg, scheduler="ddim", steps=2, progress=False)
    bad_y = Conditioning(pos.context, y=torch.zeros(2, 20, 3, 4, 4))
    with pytest.raises(ValueError, match="positive.y has shape"):
        sample_video(model, noise, bad_y, cfg=1.0, steps=2, progress=False)


@pytest.mark.parametrize("change,match", [
    (dict(noise=torch.zeros(1, 16, 3, 4, 0)), r"every size at least 1; got \(1, 16, 3, 4, 0\)"),
    (dict(noise=torch.zeros(0, 16, 3, 4, 6)), "every size at least 1"),
    (dict(cfg=-3.0), "cfg must be a finite number of at least 1.*-3.0"),
    (dict(cfg=0.5), "at least 1"),
    (dict(cfg=True), "cfg must be"),
    (dict(steps=0), "steps must be a positive integer; got 0"),
    (dict(shift=-1.0), "shift must be a positive number"),
    (dict(scheduler="ddim"), "Unknown scheduler 'ddim'"),
    (dict(denoise=-0.5), r"denoise must be in \(0, 1\]; got -0.5"),
    (dict(text_dim=4096), r"positive.context\[0\] is 8 wide; this model takes text embeddings 4096 wide"),
    (dict(positive=Conditioning([torch.zeros(1, 6, 8)])), r"positive.context\[0\] has shape \(1, 6, 8\)"),
    (dict(negative=Conditioning([torch.zeros(0, 8)])), r"negative.context\[0\] has shape \(0, 8\)"),
])
def test_check_inputs_refuses_every_bad_input_up_front(change, match):
    """The one input check the nodes, the example and the distributed client call before any work."""
    pos, neg = make_conds(1)
    inputs = dict(noise=make_noise((1, 16, 3, 4, 6), 0), positive=pos, negative=neg, cfg=5.0, steps=4, shift=5.0,
                  scheduler="unipc", text_dim=8)
    check_inputs(**inputs)  # the unchanged inputs pass
    with pytest.raises(ValueError, match=match):
        check_inputs(**dict(inputs, **change))


def test_a_real_model_refuses_text_of_the_wrong_width_in_words(tmp_path):
    """Not PyTorch's "mat1 and mat2 shapes cannot be multiplied" from the text embedding's Linear."""
    from wanvideo.checkpoint import load_wan_model
    from wanvideo.tiny import make_tiny_checkpoint
    path, config, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v")
    model = load_wan_model(path, base_precision="fp32")
    pos, neg = make_conds(1, text_dim=config["text_dim"] + 1)
    with pytest.raises(ValueError, match=f"is {config['text_dim'] + 1} wide; this model takes text embeddings "
                                         f"{config['text_dim']} wide"):
        sample_video(model, make_noise((1, 16, 1, 2, 2), 0), pos, neg, steps=1, progress=False)


# --- end to end with the tiny real model --------------------------------------------------------

@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_tiny_model_end_to_end(tmp_path, model_type):
    from wanvideo.checkpoint import load_wan_model
    from wanvideo.tiny import make_tiny_checkpoint
    path, config, _ = make_tiny_checkpoint(tmp_path / f"{model_type}.safetensors", model_type)
    model = load_wan_model(path, base_precision="fp32")
    shape = (2, 16, 2, 4, 4)
    pos, neg = make_conds(2, text_dim=config["text_dim"])
    if model_type == "i2v":
        pos.clip_fea = torch.randn(2, 257, 1280, generator=torch.Generator().manual_seed(8))
        pos.y = torch.randn(2, 20, *shape[2:], generator=torch.Generator().manual_seed(9))
    run = lambda seed, **kw: sample_video(model, make_noise(shape, seed), pos, neg, steps=3, cfg=4.0,
                                          progress=False, **kw)
    first, again, other = run(11), run(11), run(12)
    assert first.shape == shape and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert rel_err(run(11, batch_cfg=True), first) <= 1e-5  # padded text of unequal lengths in one batch


# --- inpainting (Wan 2.2 TI2V-5B image-to-video) -------------------------------------------------

class Recorder(nn.Module):
    """Wraps a model and records the x and t of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.patch_size = model.patch_size

    def forward(self, x, t, context, **kwargs):
        self.calls.append({"x": torch.stack(x).clone(), "t": t.clone()})
        return self.model(x, t, context, **kwargs)


def tiny_ti2v(tmp_path):
    from wanvideo.checkpoint import load_wan_model
    from wanvideo.tiny import make_tiny_checkpoint
    path, config, _ = make_tiny_checkpoint(tmp_path / "ti2v.safetensors", "ti2v")
    return load_wan_model(path, base_precision="fp32"), config


def first_frame_mask(batch, frames, h, w):
    """Wan22ImageToVideoLatent's mask: 0 (keep) on the first latent frame, 1 (generate) after; here
    also half of frame 1 kept, so a frame's mean is a fraction."""
    mask = torch.ones(batch, 1, frames, h, w)
    mask[:, :, 0] = 0.0
    mask[:, :, 1, :, : w // 2] = 0.0
    return mask


def test_inpaint_token_timesteps_and_blend_equal_a_direct_computation(tmp_path):
    model, config = tiny_ti2v(tmp_path)
    recorder = Recorder(model)
    shape = (1, 48, 3, 4, 4)
    noise = make_noise(shape, 3)
    x0_img = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    mask = first_frame_mask(1, 3, 4, 4)
    pos, _ = make_conds(1, text_dim=config["text_dim"])
    steps, shift = 3, 5.0
    out = sample_video(recorder, noise, pos, None, steps=steps, cfg=1.0, shift=shift, scheduler="euler",
                       inpaint=(x0_img, mask), progress=False)

    # the same run by hand: ComfyUI's KSamplerX0Inpaint blend, WAN22.process_timestep, Euler
    sigmas = flow_sigmas(steps, shift)
    x, tokens_per_frame = noise.clone(), (4 // 2) * (4 // 2)
    frame_means = torch.tensor([[0.0, 0.5, 1.0]])
    for i in range(steps):
        sigma = sigmas[i].item()
        x = x * mask + x0_img * (1 - mask)
        t = (sigma * 1000 * frame_means.double()).repeat_interleave(tokens_per_frame, dim=1).float()
        call = recorder.calls[i]
        assert call["t"].shape == (1, 3 * tokens_per_frame) and torch.equal(call["t"], t)
        assert torch.equal(call["x"], x) if i == 0 else rel_err(call["x"], x) <= 1e-6
        assert torch.equal(call["x"][mask.expand_as(x) == 0], x0_img[mask.expand_as(x) == 0])  # kept: clean
        assert call["t"][0, 0] == 0 and call["t"][0, -1] == torch.tensor(sigma * 1000, dtype=torch.float32)
        velocity = torch.stack(model(list(x), t, pos.context, seq_len=3 * tokens_per_frame))
        x0 = (x - sigma * velocity) * mask + x0_img * (1 - mask)
        x = x + (sigmas[i + 1].item() - sigma) * (x - x0) / sigma
    x = x * mask + x0_img * (1 - mask)
    assert rel_err(out, x) <= 1e-5
    kept = mask == 0
    assert torch.equal(out.expand_as(noise)[kept.expand_as(noise)], x0_img[kept.expand_as(noise)])


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_inpaint_with_a_mask_of_ones_is_plain_sampling_bit_for_bit(tmp_path, scheduler):
    model, config = tiny_ti2v(tmp_path)
    shape = (2, 48, 2, 4, 4)
    pos, neg = make_conds(2, text_dim=config["text_dim"])
    noise = make_noise(shape, 5)
    plain = sample_video(model, noise, pos, neg, steps=3, cfg=4.0, scheduler=scheduler, progress=False)
    recorder = Recorder(model)
    masked = sample_video(recorder, noise, pos, neg, steps=3, cfg=4.0, scheduler=scheduler, progress=False,
                          inpaint=(torch.randn(1, 48, 2, 4, 4), torch.ones(1, 1, 2, 4, 4)))
    assert torch.equal(masked, plain)
    assert all(call["t"].dim() == 1 for call in recorder.calls)  # the uniform call, not per-token


def test_inpaint_batched_cfg_and_unipc_keep_the_image(tmp_path):
    model, config = tiny_ti2v(tmp_path)
    shape = (2, 48, 3, 4, 4)
    pos, neg = make_conds(2, text_dim=config["text_dim"])
    x0_img = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    mask = first_frame_mask(1, 3, 4, 4)
    run = lambda **kw: sample_video(model, make_noise(shape, 7), pos, neg, steps=3, cfg=4.0, progress=False,
                                    inpaint=(x0_img, mask), **kw)
    first = run()
    assert rel_err(run(batch_cfg=True), first) <= 1e-5
    assert torch.equal(first[:, :, 0], x0_img[:, :, 0].expand(2, -1, -1, -1))
    assert torch.isfinite(first).all() and not torch.equal(first[:, :, 2], first[:, :, 2] * 0)


@pytest.mark.parametrize("inpaint,match", [
    ((torch.zeros(1, 16, 3, 4, 6), torch.ones(1, 1, 3, 4, 6)), r"inpaint.latent has shape \(1, 16, 3, 4, 6\)"),
    ((torch.zeros(1, 48, 3, 4, 6), torch.ones(1, 1, 2, 4, 6)), r"inpaint.mask has shape"),
])
def test_inpaint_refuses_shapes_that_do_not_fit(inpaint, match):
    noise = make_noise((1, 48, 3, 4, 6), 0)
    pos, _ = make_conds(1)
    with pytest.raises(ValueError, match=match):
        check_inputs(noise, pos, None, cfg=1.0, inpaint=inpaint)
