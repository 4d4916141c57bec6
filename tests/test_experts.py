"""Wan 2.2 A14B two-expert sampling: the switching rule, against diffusers' WanPipeline /
WanImageToVideoPipeline running the same tiny experts (`transformer`, `transformer_2`,
`boundary_ratio`, `guidance_scale_2`), and every expert placement against the single-device pair."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import relative_error, write_tiny_ffn_lora
from wanvideo import load_wan_model
from wanvideo.parallel.experts import load_expert_pair
from wanvideo.pipeline import LoadSettings
from wanvideo.sampling import Conditioning, ExpertPair, flow_sigmas, make_noise, sample_video
from wanvideo.sampling.experts import HIGH_NOISE, I2V_BOUNDARY, LOW_NOISE, T2V_BOUNDARY, official_boundary
from wanvideo.sampling.schedulers import FlowScheduler
from wanvideo.tiny import make_tiny_checkpoint, make_tiny_expert_pair

diffusers = pytest.importorskip("diffusers", minversion="0.35")  # transformer_2 / boundary_ratio: Wan 2.2

GRID = (3, 4, 6)             # latent frames, height, width: 9 frames of 48x32 pixels
FRAMES, HEIGHT, WIDTH = 9, 32, 48
TEXT_TOKENS = 32  # the experts' text_len: ours pads the prompt to it, diffusers gets it padded (kept small: CPU time)


def make_expert(path, in_dim=16, seed=0):
    """A tiny A14B-shaped expert: Wan 2.1 14B's architecture without CLIP; in_dim 16 (t2v) or 36 (i2v:
    noise + 4 mask + 16 image-latent channels in y). Written with its config in the header."""
    path, config, _ = make_tiny_checkpoint(path, "t2v", seed=seed, text_len=TEXT_TOKENS, in_dim=in_dim)
    return path, config


@pytest.fixture(scope="module")
def expert_files(tmp_path_factory):
    """{'t2v' / 'i2v': ((high path, config), (low path, config))}: two seeds, so the experts differ."""
    folder = tmp_path_factory.mktemp("experts")
    return {kind: tuple(make_expert(folder / f"wan2.2_tiny_{kind}_{name}.safetensors", in_dim, seed)
                        for name, seed in ((HIGH_NOISE, 11 + in_dim), (LOW_NOISE, 23 + in_dim)))
            for kind, in_dim in (("t2v", 16), ("i2v", 36))}


def texts(seed):
    """(ours: Conditioning context [L, 32], diffusers: [1, TEXT_TOKENS, 32] zero-padded as Wan does)."""
    text = torch.randn(7, 32, generator=torch.Generator().manual_seed(seed))
    padded = torch.zeros(1, TEXT_TOKENS, 32)
    padded[0, :7] = text
    return text, padded


def recorder(calls, name):
    def hook(module, args, kwargs):
        calls.append(name)
    return hook


# --- the rule -----------------------------------------------------------------------------------

def test_official_schedules_and_rule():
    """The derived official schedules (notes: T2V 40 steps shift 12 -> 26 high steps, I2V 40 steps
    shift 5 -> 15), and the int64 timestep comparison of the official code."""
    t2v = ExpertPair(object(), object(), T2V_BOUNDARY)
    assert t2v.switch_step(flow_sigmas(40, 12.0)) == 26
    assert ExpertPair(object(), object(), I2V_BOUNDARY).switch_step(flow_sigmas(40, 5.0)) == 15
    assert official_boundary(16) == 0.875 and official_boundary(36) == 0.900
    pair = ExpertPair(object(), object(), 0.8755)   # threshold 875.5: t = 875.7 truncates to 875 -> low-noise
    assert not pair.uses_high_noise(0.8757) and pair.uses_high_noise(0.8761)
    assert t2v.uses_high_noise(0.875) and not t2v.uses_high_noise(0.87499)
    assert "high-noise steps 0-25" in t2v.describe_schedule(flow_sigmas(40, 12.0))
    # diffusers' UniPC int64 timesteps on the same grid, compared as its pipelines do: the same experts
    for boundary, shift in ((T2V_BOUNDARY, 12.0), (I2V_BOUNDARY, 5.0), (0.8755, 12.0), (0.5, 3.0)):
        solver = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)
        solver.set_timesteps(sigmas=diffusers_grid(40))
        assert solver.timesteps.dtype == torch.int64
        assert ([HIGH_NOISE if t >= boundary * 1000 else LOW_NOISE for t in solver.timesteps]
                == ExpertPair(object(), object(), boundary).schedule(flow_sigmas(40, shift)))
    for bad in (0, 1, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="boundary"):
            ExpertPair(object(), object(), bad)


# --- against diffusers --------------------------------------------------------------------------

def diffusers_grid(steps):
    """Wan's unshifted grid (wanvideo.sampling.flow_sigmas before the shift), for diffusers' schedulers."""
    return np.linspace(1 - 1 / 1000, 0, steps + 1)[:-1]


def diffusers_scheduler(name, shift):
    """diffusers' own solver on Wan's grid: the pipelines call set_timesteps(steps, device), so the grid
    is handed over there (diffusers' default UniPC grid starts 1/1000 higher, see test_sampling).

    diffusers' UniPC (like the official Wan solvers) hands the model int64 timesteps, int(sigma * 1000);
    our loop, like ComfyUI and diffusers' Euler, hands it sigma * 1000 unrounded. The test gives
    UniPC's model calls the unrounded timesteps too, so the latents compare the solvers and the switch,
    not the rounding; the expert choice is the same either way for the integer thresholds 875 / 900
    (and test_official_schedules_and_rule checks our int64 comparison)."""
    if name == "euler":
        base, kwargs = diffusers.FlowMatchEulerDiscreteScheduler, dict(shift=shift)
    else:
        base, kwargs = diffusers.UniPCMultistepScheduler, dict(use_flow_sigmas=True, flow_shift=shift,
                                                               prediction_type="flow_prediction")

    class OnWanGrid(base):
        def set_timesteps(self, num_inference_steps=None, device=None, **_):
            super().set_timesteps(sigmas=diffusers_grid(num_inference_steps), device=device)
            if name == "unipc":  # the pipeline calls set_begin_index(0): steps are counted, not looked up
                self.timesteps = (flow_sigmas(num_inference_steps, shift)[:-1] * 1000).float()

    return OnWanGrid(**kwargs)


def tiny_vae():
    """A random Wan VAE at toy width (8x spatial, 4x temporal, 16 latent channels, like the real one)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()


def run_diffusers(kind, experts, boundary, scheduler, steps, shift, cfg_high, cfg_low, latents, prompt, negative):
    """diffusers' pipeline with transformer = high-noise and transformer_2 = low-noise expert.
    -> (latents, expert name of each step, y seen by the model or None)."""
    pytest.importorskip("transformers")  # diffusers' pipelines import it
    from test_model_equivalence import diffusers_model
    high, low = (diffusers_model(path, config) for path, config in experts)
    calls, inputs = [], []
    high.register_forward_pre_hook(recorder(calls, HIGH_NOISE), with_kwargs=True)
    low.register_forward_pre_hook(recorder(calls, LOW_NOISE), with_kwargs=True)
    high.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
    common = dict(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents, height=HEIGHT, width=WIDTH,
                  num_frames=FRAMES, num_inference_steps=steps, guidance_scale=cfg_high, guidance_scale_2=cfg_low,
                  output_type="latent")
    components = dict(tokenizer=None, text_encoder=None, scheduler=diffusers_scheduler(scheduler, shift),
                      transformer=high, transformer_2=low, boundary_ratio=boundary)
    with torch.no_grad():
        if kind == "t2v":
            out = diffusers.WanPipeline(vae=None, **components)(**common).frames
        else:
            image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
            pipe = diffusers.WanImageToVideoPipeline(vae=tiny_vae(), image_encoder=None, image_processor=None,
                                                     **components)
            out = pipe(image=image, **common).frames
    y = inputs[0][:, 16:] if kind == "i2v" else None   # cat[latents, mask (4) + image latents (16)]
    return out, calls[::2], y  # two calls per step (cond, uncond)


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
@pytest.mark.parametrize("kind,steps,shift,cfg_high,cfg_low", [("t2v", 8, 12.0, 4.0, 3.0), ("i2v", 8, 5.0, 3.5, 2.5)])
def test_expert_pair_matches_diffusers(expert_files, kind, scheduler, steps, shift, cfg_high, cfg_low):
    """The same expert at every step and the same latents as diffusers' two-transformer pipeline."""
    experts = expert_files[kind]
    boundary = official_boundary(experts[0][1]["in_dim"])
    noise = make_noise((1, 16, *GRID), seed=5)
    (text, padded), (neg_text, neg_padded) = texts(1), texts(2)
    expected, diffusers_steps, y = run_diffusers(kind, experts, boundary, scheduler, steps, shift, cfg_high, cfg_low,
                                                 noise.clone(), padded, neg_padded)
    high, low = (load_wan_model(path, base_precision="fp32") for path, _ in experts)
    calls = []
    high.register_forward_pre_hook(recorder(calls, HIGH_NOISE), with_kwargs=True)
    low.register_forward_pre_hook(recorder(calls, LOW_NOISE), with_kwargs=True)
    pair = ExpertPair(high, low, boundary)
    out = sample_video(pair, noise, Conditioning([text], y=y), Conditioning([neg_text]), steps=steps, cfg=cfg_high,
                       cfg_low_noise=cfg_low, shift=shift, scheduler=scheduler, batch_cfg=False, progress=False)
    assert calls[::2] == diffusers_steps == pair.schedule(flow_sigmas(steps, shift))
    assert HIGH_NOISE in diffusers_steps and LOW_NOISE in diffusers_steps  # the run crosses the boundary
    assert relative_error(out, expected) <= 1e-5, relative_error(out, expected)


def test_solver_history_is_kept_across_the_switch(expert_files):
    """One UniPC run through the pair equals a run of one model that dispatches on the timestep itself
    (no restart of the multistep history at the switch), and differs from restarting the solver."""
    (high_path, _), (low_path, _) = expert_files["t2v"]
    high, low = (load_wan_model(p, base_precision="fp32") for p in (high_path, low_path))

    class Dispatch(torch.nn.Module):
        def forward(self, x, t, context, **kwargs):
            return (high if int(t[0].item()) >= 875 else low)(x, t, context, **kwargs)

    noise, (text, _) = make_noise((1, 16, *GRID), seed=3), texts(4)
    args = dict(steps=6, cfg=1.0, shift=12.0, scheduler="unipc", progress=False)
    pair_out = sample_video(ExpertPair(high, low, 0.875), noise, Conditioning([text]), **args)
    assert torch.equal(pair_out, sample_video(Dispatch(), noise, Conditioning([text]), **args))


def test_loop_guidance_per_expert_and_errors(expert_files):
    (high_path, _), (low_path, _) = expert_files["t2v"]
    high, low = (load_wan_model(p, base_precision="fp32") for p in (high_path, low_path))
    noise, (text, _), (neg, _) = make_noise((1, 16, *GRID), seed=3), texts(4), texts(5)
    pair = ExpertPair(high, low, 0.875)
    calls = []
    high.register_forward_pre_hook(recorder(calls, HIGH_NOISE), with_kwargs=True)
    low.register_forward_pre_hook(recorder(calls, LOW_NOISE), with_kwargs=True)
    # cfg 1 on the high-noise expert: its steps make one call, the low-noise ones (cfg 3) two
    sample_video(pair, noise, Conditioning([text]), Conditioning([neg]), steps=6, cfg=1.0, cfg_low_noise=3.0,
                 shift=12.0, batch_cfg=False, progress=False)
    schedule = pair.schedule(flow_sigmas(6, 12.0))
    assert calls == [n for n in schedule for _ in range(1 if n == HIGH_NOISE else 2)]
    with pytest.raises(ValueError, match="negative"):
        sample_video(pair, noise, Conditioning([text]), None, steps=2, cfg=1.0, cfg_low_noise=3.0, progress=False)
    with pytest.raises(ValueError, match="cfg_low_noise"):
        sample_video(pair, noise, Conditioning([text]), Conditioning([neg]), steps=2, cfg_low_noise=float("nan"),
                     progress=False)
    with pytest.raises(ValueError, match="single one"):
        sample_video(high, noise, Conditioning([text]), Conditioning([neg]), steps=2, cfg_low_noise=3.0,
                     progress=False)


# --- placements -----------------------------------------------------------------------------------

CPU = torch.device("cpu")
CPU_PAIR = [torch.device("cpu", 0), torch.device("cpu", 1)]  # distinct devices: the latents hop between them
FP32 = LoadSettings(base_precision="fp32")
RUN = dict(steps=6, cfg=4.0, cfg_low_noise=3.0, shift=12.0, scheduler="unipc", progress=False)


def run_pair(pipeline, kind, **overrides):
    """Two videos of a batch of 2 through a loaded pair (t2v, or i2v with y)."""
    g = torch.Generator().manual_seed(9)
    y = torch.randn(2, 20, *GRID, generator=g) if kind == "i2v" else None
    positive = Conditioning([torch.randn(7, 32, generator=g), torch.randn(4, 32, generator=g)], y=y)
    negative = Conditioning([torch.randn(5, 32, generator=g)] * 2)
    return pipeline.generate(make_noise((2, 16, *GRID), seed=13), positive, negative, **dict(RUN, **overrides))


@pytest.fixture(scope="module")
def single_device(expert_files):
    """{kind: latents} of the plain single-device pair, checked against an ExpertPair of two WanModels."""
    out = {}
    for kind, ((high, _), (low, _)) in expert_files.items():
        pipeline = load_expert_pair(high, low, "none", settings=FP32, devices=[CPU], idle_expert="resident")
        out[kind] = run_pair(pipeline, kind)
        models = ExpertPair(*(load_wan_model(p, base_precision="fp32") for p in (high, low)), pipeline.boundary)

        class Direct:
            generate = staticmethod(lambda *a, **k: sample_video(models, *a, **k))
        assert torch.equal(run_pair(Direct, kind), out[kind])
        pipeline.unload()
    return out


@pytest.fixture()
def hops(monkeypatch):
    """Devices the solver's history moved to (the latents hop with it)."""
    moved, original = [], FlowScheduler.to
    monkeypatch.setattr(FlowScheduler, "to", lambda self, device: moved.append(str(device)) or original(self, device))
    return moved


@pytest.mark.parametrize("kind, strategy, devices, kwargs, described", [
    ("t2v", "none", [CPU], dict(idle_expert="cpu"), "rests in host memory"),
    ("i2v", "none", [CPU], dict(idle_expert="cpu"), "rests in host memory"),
    ("t2v", "expert_parallel", CPU_PAIR, {}, "high-noise expert on cpu:0 (none)"),
    ("i2v", "expert_parallel", CPU_PAIR, {}, "low-noise expert on cpu:1 (none)"),
    ("t2v", "expert_parallel", [torch.device("cpu", i) for i in range(4)], dict(inner_parallelism="data_parallel"),
     "low-noise expert on cpu:2, cpu:3 (data_parallel)"),
    ("i2v", "expert_parallel", [torch.device("cpu", i) for i in range(4)], dict(inner_parallelism="block_distribution"),
     "high-noise expert on cpu:0, cpu:1 (block_distribution)"),
    ("t2v", "data_parallel", [CPU, CPU], {}, "data_parallel for each expert"),
    ("i2v", "block_distribution", [CPU, CPU], {}, "block_distribution for each expert"),
    ("t2v", "data_parallel", [CPU, CPU], dict(idle_expert="cpu"), "rests in host memory"),
])
def test_placement_matches_single_device(expert_files, single_device, hops, kind, strategy, devices, kwargs,
                                         described):
    (high, _), (low, _) = expert_files[kind]
    pipeline = load_expert_pair(high, low, strategy, settings=FP32, devices=devices, **kwargs)
    assert described in pipeline.describe()
    for run in range(2):  # the second run starts with the high-noise expert back in place
        assert relative_error(run_pair(pipeline, kind), single_device[kind]) <= 1e-5
        if kwargs.get("idle_expert") == "cpu":  # (the high-noise expert comes back before each run)
            switch = ExpertPair(object(), object(), T2V_BOUNDARY).switch_step(flow_sigmas(6, 12.0))
            assert [(s, n) for s, n, _ in pipeline.last_switches] == [(switch, LOW_NOISE)]
    if strategy == "expert_parallel":  # one hop per run, to the low-noise expert's first device
        assert hops == [str(devices[len(devices) // 2])] * 2
    pipeline.unload()
    with pytest.raises(RuntimeError, match="unloaded"):
        run_pair(pipeline, kind)


def test_host_mirror_frees_the_idle_expert_and_boundary_per_run(expert_files, single_device):
    (high, _), (low, _) = expert_files["t2v"]
    pipeline = load_expert_pair(high, low, "none", settings=FP32, devices=[CPU], idle_expert="cpu")
    low_model = pipeline.pipelines[LOW_NOISE].denoiser
    mirror = pipeline.residency[LOW_NOISE]
    assert not mirror.resident and all(p.data_ptr() in {v.data_ptr() for _, v, _ in mirror.entries}
                                       for p in low_model.parameters())  # resting on the mirror
    # a boundary given for one run: 0.95 switches a step earlier than 0.875 on this schedule
    sigmas = flow_sigmas(6, 12.0)
    run_pair(pipeline, "t2v", boundary=0.95)
    assert [s for s, _, _ in pipeline.last_switches] == [ExpertPair(object(), object(), 0.95).switch_step(sigmas)] \
        == [ExpertPair(object(), object(), T2V_BOUNDARY).switch_step(sigmas) - 1]
    pipeline.step_aside()
    assert pipeline.is_aside and not any(r.resident for r in pipeline.residency.values())
    assert relative_error(run_pair(pipeline, "t2v"), single_device["t2v"]) <= 1e-5
    pipeline.unload()


def test_load_errors(expert_files, tmp_path):
    (high, _), (low, _) = expert_files["t2v"]
    (i2v_high, _), _ = expert_files["i2v"]
    with pytest.raises(ValueError, match="not two experts of one model: in_dim 36 vs 16"):
        load_expert_pair(i2v_high, low, "none", settings=FP32, devices=[CPU])
    swapped = tmp_path / "wan2.2_t2v_low_noise_14B.safetensors"
    swapped.write_bytes(high.read_bytes())
    with pytest.raises(ValueError, match="swapped"):
        load_expert_pair(swapped, low, "none", settings=FP32, devices=[CPU])
    with pytest.raises(ValueError, match="at least 2"):
        load_expert_pair(high, low, "expert_parallel", settings=FP32, devices=[CPU])
    with pytest.raises(ValueError, match="boundary"):
        load_expert_pair(high, low, "none", settings=FP32, devices=[CPU], boundary=1.0)
    import wanvideo.api as api
    with pytest.raises(ValueError, match="needs a low-noise expert file"):
        api.load(high, "expert_parallel", settings=FP32, devices=[CPU, CPU])


def test_api_front_and_official_boundary(expert_files, single_device):
    import wanvideo.api as api
    (high, _), (low, _) = expert_files["i2v"]
    pipeline = api.load(high, "none", settings=FP32, device=CPU, low_noise_path=low)
    assert isinstance(pipeline, api.ExpertPairPipeline) and pipeline.boundary == I2V_BOUNDARY
    assert "boundary 0.9 (t >= 900: high-noise)" in pipeline.describe()
    assert relative_error(run_pair(pipeline, "i2v"), single_device["i2v"]) <= 1e-5
    pipeline.unload()


@pytest.mark.parametrize("kind, ranks", [("t2v", 2), ("i2v", 4)])
def test_distributed_pair_on_gloo_ranks(expert_files, single_device, kind, ranks):
    """Two worker groups (one per expert) on the same CPU 'GPUs', driven step by step."""
    (high, _), (low, _) = expert_files[kind]
    devices = [torch.device("cpu", i) for i in range(ranks)]
    pipeline = load_expert_pair(high, low, "distributed", settings=FP32, devices=devices)
    try:
        assert "two worker groups" in pipeline.describe()
        assert [len(p.runner.devices) for p in pipeline.pipelines.values()] == [ranks, ranks]
        assert relative_error(run_pair(pipeline, kind), single_device[kind]) <= 1e-5
    finally:
        pipeline.unload()


# --- the nodes --------------------------------------------------------------------------------------

@pytest.fixture()
def pair_folder(tmp_path, monkeypatch):
    """models/diffusion_models with a tiny t2v expert pair (umT5-wide text) and models/loras with one LoRA."""
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    make_tiny_expert_pair(folder, "t2v", seeds=(1, 2), text_len=16, text_dim=4096)
    loras = tmp_path / "loras"
    loras.mkdir()
    write_tiny_ffn_lora(loras / "lightning.safetensors")
    monkeypatch.setenv("WANVIDEO_DIFFUSION_MODELS_DIR", str(folder))
    monkeypatch.setenv("WANVIDEO_LORAS_DIR", str(loras))
    return folder


def test_nodes_end_to_end_with_an_expert_pair(pair_folder, monkeypatch):
    import sys
    from test_nodes import PACKAGE, text_conditioning
    nodes = PACKAGE.NODE_CLASS_MAPPINGS
    loader, multi = nodes["WanMultiGPUModelLoader"](), nodes["WanVideoMultiGPULoader"]()
    sampler = nodes["WanMultiGPUSampler"]()
    high, low = (f"wan2.2_tiny_t2v_{name}.safetensors" for name in (HIGH_NOISE, LOW_NOISE))
    optional = loader.INPUT_TYPES()["optional"]
    assert optional["low_noise_model"][0] == ["none", high, low]
    assert "high-noise" in optional["low_noise_model"][1]["tooltip"]
    assert "expert_parallel" in multi.INPUT_TYPES()["required"]["parallelism_type"][0]
    sampler_inputs = sampler.INPUT_TYPES()["optional"]
    assert sampler_inputs["boundary"][1]["default"] == 0.0 and sampler_inputs["cfg_low_noise"][1]["default"] == -1.0

    def sample(pipeline, **kwargs):
        (out,) = sampler.sample(pipeline, text_conditioning(1, tokens=16), text_conditioning(2, tokens=16), 48, 32, 5,
                                steps=6, cfg=4.0, shift=12.0, seed=7, scheduler="unipc", denoise=1.0, **kwargs)
        return out["samples"]

    (pair,) = loader.load(high, "fp32", "disabled", "main_device", "sdpa", low_noise_model=low)
    assert isinstance(pair, PACKAGE.wanvideo.api.ExpertPairPipeline)
    assert "high-noise + low-noise experts, boundary 0.875" in pair.describe()
    reference = sample(pair)
    assert torch.equal(sample(pair, boundary=0.875, cfg_low_noise=4.0), reference)  # the defaults, said explicitly
    assert not torch.allclose(sample(pair, cfg_low_noise=2.0), reference)
    assert not torch.allclose(sample(pair, boundary=0.95), reference)

    # the Multi-GPU loader: expert_parallel on two CPU 'GPUs' gives the same video
    experts_module = sys.modules[f"{PACKAGE.__name__}.wanvideo.parallel.experts"]
    cpus = [torch.device("cpu", 0), torch.device("cpu", 1)]
    monkeypatch.setattr(experts_module, "resolve_devices", lambda gpu_ids, devices=None: cpus)
    monkeypatch.setattr(PACKAGE.wanvideo.api, "validate_gpu_setup", lambda gpu_ids: (True, "ok"))
    split, plan = multi.load(high, "fp32", "disabled", "main_device", "sdpa", parallelism_type="expert_parallel",
                             gpu_ids="0,1", low_noise_model=low)
    assert "high-noise expert on cpu:0" in plan and "low-noise expert on cpu:1" in plan
    assert relative_error(sample(split), reference) <= 1e-5
    with pytest.raises(ValueError, match="needs a low-noise expert file"):
        multi.load(high, "fp32", "disabled", "main_device", "sdpa", parallelism_type="expert_parallel", gpu_ids="0,1")

    # a LoRA for one expert merges into that expert only
    select = nodes["WanMultiGPULoraSelect"]()
    assert select.INPUT_TYPES()["optional"]["applies_to"][0] == ["both", "high_noise", "low_noise"]
    (chain,) = select.select("lightning.safetensors", 1.0, applies_to="low_noise")
    (with_lora,) = loader.load(high, "fp32", "disabled", "main_device", "sdpa", lora=chain, low_noise_model=low)
    # compared on the CPU: on a GPU machine the idle expert rests in host memory
    weights = {name: p.denoiser.blocks[0].ffn[0].weight.cpu() for name, p in with_lora.pipelines.items()}
    plain = {name: p.denoiser.blocks[0].ffn[0].weight.cpu() for name, p in loader.load(
        high, "fp32", "disabled", "main_device", "sdpa", low_noise_model=low)[0].pipelines.items()}
    assert torch.equal(weights[HIGH_NOISE], plain[HIGH_NOISE]) and not torch.equal(weights[LOW_NOISE], plain[LOW_NOISE])
    # a single model ignores the pair's inputs (with a warning) and takes every LoRA
    (single,) = loader.load(high, "fp32", "disabled", "main_device", "sdpa", lora=chain)
    assert not torch.equal(single.denoiser.blocks[0].ffn[0].weight.cpu(), plain[HIGH_NOISE])
    assert torch.equal(sample(single, boundary=0.5, cfg_low_noise=2.0), sample(single))

