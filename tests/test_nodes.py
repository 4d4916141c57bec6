"""The ComfyUI nodes without ComfyUI: declarations, ids, and loader -> sampler end to end on CPU."""
import importlib.util
import sys
import types

import pytest
import torch

from conftest import relative_error, write_tiny_ffn_lora
from known_node_ids import COMFY_API_WAN_NODE_IDS, COMFY_CORE_NODE_IDS, WANVIDEOWRAPPER_NODE_IDS
from wanvideo.latent_format import LATENTS_MEAN, LATENTS_STD, normalize_latents
from wanvideo.tiny import make_tiny_checkpoint

VALID_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def load_package():
    """Import the repository as ComfyUI does: a package from its folder's __init__.py."""
    root = __file__.rsplit("/tests/", 1)[0]
    spec = importlib.util.spec_from_file_location("wanvideo_multigpu_pack", f"{root}/__init__.py",
                                                  submodule_search_locations=[root])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return package


PACKAGE = load_package()
comfy_host, nodes_sampler = PACKAGE.comfy_host, PACKAGE.nodes_sampler


@pytest.fixture()
def models_folder(tmp_path, monkeypatch):
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    for model_type in ("t2v", "i2v"):
        make_tiny_checkpoint(folder / f"wan_tiny_{model_type}.safetensors", model_type,
                             prefix="model.diffusion_model.", text_dim=4096)  # native umT5 width
    (folder / "old_format.ckpt").write_bytes(b"not listed")
    monkeypatch.setenv("WANVIDEO_DIFFUSION_MODELS_DIR", str(folder))
    monkeypatch.setenv("WANVIDEO_LORAS_DIR", str(tmp_path / "loras"))
    return folder


@pytest.mark.parametrize("node_id", sorted(PACKAGE.NODE_CLASS_MAPPINGS))
def test_node_declarations(node_id, models_folder):
    node = PACKAGE.NODE_CLASS_MAPPINGS[node_id]
    assert node_id in PACKAGE.NODE_DISPLAY_NAME_MAPPINGS
    inputs = node.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional", "hidden"} and inputs["required"]
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            kind, options = spec
            assert isinstance(kind, list) or isinstance(kind, str), (node_id, name)
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, list) and "default" in options:
                assert options["default"] in kind, (node_id, name)
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], (node_id, name)
    assert isinstance(node.RETURN_TYPES, tuple) and len(node.RETURN_NAMES) == len(node.RETURN_TYPES)
    assert callable(getattr(node(), node.FUNCTION))
    assert node.CATEGORY == "WanVideoMultiGPU" and node.DESCRIPTION


def test_compile_node_offers_only_modes_that_compile_blocks_takes():
    """No CUDA-graph mode: on a GPU its first forward failed (one graph serves every block)."""
    node = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUCompileSettings"]()
    modes = node.INPUT_TYPES()["required"]["mode"][0]
    assert "reduce-overhead" not in modes and "max-autotune" not in modes
    engine = PACKAGE.wanvideo.engine  # the pack's own copy of the library
    for mode in modes:
        model = torch.nn.Module()
        model.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        (settings,) = node.settings(mode, dynamic=False, fullgraph=False)
        engine.compile_blocks(model, **settings)  # lazy: checks the settings, compiles at the first call
        assert engine.is_block_compiled(model.blocks[0])


def test_node_ids_do_not_collide():
    ours = set(PACKAGE.NODE_CLASS_MAPPINGS)
    taken = set(COMFY_CORE_NODE_IDS) | set(COMFY_API_WAN_NODE_IDS) | set(WANVIDEOWRAPPER_NODE_IDS)
    assert not (ours - {"WanVideoMultiGPULoader"}) & taken
    assert not set(PACKAGE.NODE_DISPLAY_NAME_MAPPINGS.values()) & taken


def test_loader_lists_safetensors_only(models_folder):
    listed = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"].INPUT_TYPES()["required"]["model"][0]
    assert listed == ["wan_tiny_i2v.safetensors", "wan_tiny_t2v.safetensors"]
    with pytest.raises(FileNotFoundError, match="models/diffusion_models"):
        comfy_host.model_file_path("diffusion_models", "gone.safetensors")


def text_conditioning(seed, tokens=512, extras=None):
    """CLIPTextEncode's output for the wan umT5: (1, max(512, n + 1), 4096), zero rows after the prompt."""
    text = torch.zeros(1, tokens, 4096)
    text[0, :9] = torch.randn(9, 4096, generator=torch.Generator().manual_seed(seed))
    return [[text, dict(extras or {}, pooled_output=None)]]


class ClipVisionOutput:
    """Shaped like comfy.clip_vision.Output for CLIP-H."""

    def __init__(self, seed):
        self.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(seed))

    def __getitem__(self, key):
        return getattr(self, key)


def image_to_video_extras(frames=21, height=4, width=6, seed=0):
    """What WanImageToVideo adds to the conditioning for one start frame (raw latents, 0 = known)."""
    mask = torch.ones(1, 1, frames, height, width)
    mask[:, :, :1] = 0.0
    image = torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2
    return {"concat_latent_image": image, "concat_mask": mask, "clip_vision_output": ClipVisionOutput(seed)}


def test_image_conditioning_layout():
    extras = image_to_video_extras(frames=3)
    cond = nodes_sampler.comfy_to_conditioning(text_conditioning(0, extras=extras), "positive", "i2v", 2, (3, 4, 6))
    assert cond.y.shape == (2, 20, 3, 4, 6) and cond.clip_fea.shape == (2, 257, 1280)
    assert torch.equal(cond.y[:, :4, 0], torch.ones(2, 4, 4, 6))    # first frame known: mask 1
    assert torch.equal(cond.y[:, :4, 1:], torch.zeros(2, 4, 2, 4, 6))
    expected = (extras["concat_latent_image"][0] - torch.tensor(LATENTS_MEAN).view(16, 1, 1, 1)) \
        / torch.tensor(LATENTS_STD).view(16, 1, 1, 1)
    assert torch.allclose(cond.y[0, 4:], expected, atol=1e-6)
    with pytest.raises(ValueError, match="CLIP vision"):
        nodes_sampler.comfy_to_conditioning(text_conditioning(0), "positive", "i2v", 1, (3, 4, 6))
    with pytest.raises(ValueError, match="4096"):
        nodes_sampler.comfy_to_conditioning([[torch.zeros(1, 77, 768), {}]], "positive", "t2v", 1, (3, 4, 6))


def run_workflow(model_type, seed=7, cfg=5.0, **loader_args):
    loader = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()
    sampler = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]()
    (pipeline,) = loader.load(f"wan_tiny_{model_type}.safetensors", "fp32", "disabled", "main_device", "sdpa",
                              **loader_args)
    extras = image_to_video_extras(frames=2) if model_type == "i2v" else None
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)} if model_type == "i2v" else None
    (out,) = sampler.sample(pipeline, text_conditioning(1, extras=extras), text_conditioning(2, extras=extras),
                            48, 32, 5, steps=3, cfg=cfg, shift=3.0, seed=seed, scheduler="unipc", denoise=1.0,
                            latent=latent)
    return out["samples"], pipeline


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_loader_to_sampler_end_to_end(models_folder, model_type):
    samples, pipeline = run_workflow(model_type)
    assert samples.shape == (1, 16, 2, 4, 6) and samples.dtype == torch.float32 and torch.isfinite(samples).all()
    assert torch.equal(run_workflow(model_type)[0], samples)           # same seed, same video
    assert not torch.equal(run_workflow(model_type, seed=8)[0], samples)
    assert "wan_tiny" not in pipeline.describe() and model_type in pipeline.describe()


def test_block_swap_node_gives_the_same_video(models_folder):
    (swap,) = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUBlockSwap"]().settings(2, 1, True, True, False)
    reference, _ = run_workflow("t2v")
    swapped, pipeline = run_workflow("t2v", block_swap_args=swap)
    assert torch.allclose(swapped, reference, rtol=1e-5, atol=1e-5)
    assert "blocks 0-1 swapped" in pipeline.placement
    pipeline.unload()
    with pytest.raises(RuntimeError, match="unloaded"):
        pipeline.generate(torch.zeros(1, 16, 1, 2, 2), None)


def test_lora_select_chains_and_merges(models_folder, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    write_tiny_ffn_lora(folder / "style.safetensors")
    select = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPULoraSelect"]()
    assert select.INPUT_TYPES()["required"]["lora"][0] == ["style.safetensors"]
    (chain,) = select.select("style.safetensors", 0.5)
    (chain,) = select.select("style.safetensors", 0.25, prev_lora=chain)
    assert [(s, target) for _, s, target in chain] == [(0.5, "both"), (0.25, "both")]
    with_lora, _ = run_workflow("t2v", lora=chain)
    assert not torch.allclose(with_lora, run_workflow("t2v")[0])


def test_interrupt_stops_within_one_step(models_folder, monkeypatch):
    calls = []
    monkeypatch.setattr(comfy_host, "check_interrupt", lambda: calls.append(1) or (len(calls) > 1 and _raise()))
    with pytest.raises(KeyboardInterrupt):
        run_workflow("t2v")
    assert len(calls) == 2  # stopped before the second step's model call


def _raise():
    raise KeyboardInterrupt("cancelled")


def test_video_to_video_needs_a_latent(models_folder):
    sampler = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]()
    loader = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()
    (pipeline,) = loader.load("wan_tiny_t2v.safetensors", "fp32", "disabled", "main_device", "sdpa")
    cond = text_conditioning(1)
    with pytest.raises(ValueError, match="needs a latent"):
        sampler.sample(pipeline, cond, cond, 48, 32, 5, 2, 5.0, 3.0, 0, "euler", 0.5)
    raw = torch.randn(1, 16, 2, 4, 6)
    (out,) = sampler.sample(pipeline, cond, cond, 48, 32, 5, 2, 5.0, 3.0, 0, "euler", 0.3, latent={"samples": raw})
    (full,) = sampler.sample(pipeline, cond, cond, 48, 32, 5, 2, 5.0, 3.0, 0, "euler", 1.0, latent={"samples": raw})
    # a light denoise stays closer to the input video than a full one
    assert (out["samples"] - raw).norm() < (full["samples"] - raw).norm()
    # the input is normalised with the published Wan 2.1 VAE statistics (wan/modules/vae.py), typed
    # here for a few channels rather than read from the package
    for channel, mean, std in ((0, -0.7571, 2.8184), (7, 1.5508, 2.0743), (15, -0.2921, 1.9160)):
        assert torch.allclose(normalize_latents(raw)[:, channel], (raw[:, channel] - mean) / std)


@pytest.mark.parametrize("strategy", ["data_parallel", "block_distribution"])
def test_multi_gpu_loader_node(models_folder, monkeypatch, strategy):
    """The documented node on two CPU 'devices' gives the standard loader's video and shows its plan."""
    load_module = sys.modules[f"{PACKAGE.__name__}.wanvideo.parallel.load"]  # the pack's own copy of the library
    cpus = [torch.device("cpu", 0), torch.device("cpu", 1)]  # distinct: data_parallel makes two replicas
    monkeypatch.setattr(load_module, "resolve_devices", lambda gpu_ids, devices=None: cpus)
    monkeypatch.setattr(PACKAGE.wanvideo.api, "validate_gpu_setup", lambda gpu_ids: (True, "ok"))
    node = PACKAGE.NODE_CLASS_MAPPINGS["WanVideoMultiGPULoader"]()
    required = node.INPUT_TYPES()["required"]
    assert required["parallelism_type"][1]["default"] == "auto" and required["gpu_ids"][1]["default"] == "0,1"
    pipeline, plan = node.load("wan_tiny_t2v.safetensors", "fp32", "disabled", "main_device", "sdpa",
                               parallelism_type=strategy, gpu_ids="0,1")
    assert ("replica" in plan) if strategy == "data_parallel" else ("cpu:0: blocks 0-1" in plan and "head" in plan)
    items_per_forward = {}  # per data-parallel replica: the batch size of each of its forwards
    for replica in getattr(pipeline.denoiser, "replicas", []):
        record = items_per_forward.setdefault(id(replica), [])
        replica.register_forward_pre_hook(lambda module, args, kwargs, record=record: record.append(len(kwargs["x"])),
                                          with_kwargs=True)
    sampler = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]()
    (out,) = sampler.sample(pipeline, text_conditioning(1), text_conditioning(2), 48, 32, 5, steps=3, cfg=5.0,
                            shift=3.0, seed=7, scheduler="unipc", denoise=1.0)
    reference, _ = run_workflow("t2v")
    assert relative_error(out["samples"], reference) <= 1e-5
    if strategy == "data_parallel":  # two replicas, each ran cond or uncond at every step
        assert list(items_per_forward.values()) == [[1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("change,match", [
    (dict(num_frames=10), r"num_frames=10 is not valid.*9 or 13 are near"),  # was silently 9 frames
    (dict(width=40), r"width=40 is not valid.*32 or 48 are near"),
    (dict(height=0), "height=0 is not valid"),
    (dict(cfg=0.5), "cfg must be a finite number of at least 1"),             # the widget's min, said for the API
    (dict(steps=0), "steps must be a positive integer"),
    (dict(scheduler="ddim"), "Unknown scheduler 'ddim'"),
    (dict(latent={"samples": torch.zeros(1, 16, 0, 4, 6)}), "every size at least 1"),
])
def test_sampler_node_refuses_bad_inputs_in_one_message(models_folder, change, match):
    loader = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()
    (pipeline,) = loader.load("wan_tiny_t2v.safetensors", "fp32", "disabled", "main_device", "sdpa")
    inputs = dict(model=pipeline, positive=text_conditioning(1), negative=text_conditioning(2), width=48, height=32,
                  num_frames=5, steps=2, cfg=5.0, shift=3.0, seed=0, scheduler="euler", denoise=1.0)
    with pytest.raises(ValueError, match=match):
        PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]().sample(**dict(inputs, **change))


def test_sampler_node_checks_the_text_width_against_the_model(models_folder):
    """A model whose text embedding is not 4096 wide gets one clear message, not the first Linear's
    "mat1 and mat2 shapes cannot be multiplied"."""
    make_tiny_checkpoint(models_folder / "wan_tiny_narrow.safetensors", "t2v", prefix="model.diffusion_model.",
                         text_dim=32)
    loader = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()
    (pipeline,) = loader.load("wan_tiny_narrow.safetensors", "fp32", "disabled", "main_device", "sdpa")
    with pytest.raises(ValueError, match=r"positive holds text embeddings of shape \(1, 512, 4096\).*\(1, L, 32\)"):
        PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]().sample(
            pipeline, text_conditioning(1), text_conditioning(2), 48, 32, 5, 2, 5.0, 3.0, 0, "euler", 1.0)


def test_image_conditioning_edge_cases():
    extras = image_to_video_extras(frames=3)
    del extras["concat_mask"]  # no mask: nothing is known, as in ComfyUI's own Wan model
    cond = nodes_sampler.comfy_to_conditioning(text_conditioning(0, extras=extras), "positive", "i2v", 1, (3, 4, 6))
    assert torch.equal(cond.y[:, :4], torch.zeros(1, 4, 3, 4, 6))
    negative = nodes_sampler.comfy_to_conditioning(text_conditioning(1), "negative", "i2v", 1, (3, 4, 6))
    assert negative.clip_fea is None and negative.y is None  # the loop gives it the positive's
    with pytest.raises(ValueError, match=r"needs \[1, 514, 1280\].*WanFirstLastFrameToVideo"):
        nodes_sampler.comfy_to_conditioning(text_conditioning(0, extras=image_to_video_extras(frames=3)),
                                            "positive", "flf2v", 1, (3, 4, 6))


def test_reloading_unloads_the_previous_model(models_folder):
    loader = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()
    (first,) = loader.load("wan_tiny_t2v.safetensors", "fp32", "disabled", "main_device", "sdpa")
    (second,) = loader.load("wan_tiny_t2v.safetensors", "fp32", "disabled", "main_device", "sdpa")
    assert first.denoiser is None and second.denoiser is not None


# --- Wan 2.2: TI2V-5B (Wan22 latents, noise_mask image-to-video) and I2V-A14B (no CLIP) --------------

@pytest.fixture()
def wan22_folder(models_folder):
    from wanvideo.tiny import make_tiny_expert_pair
    make_tiny_checkpoint(models_folder / "wan2.2_tiny_ti2v_5B.safetensors", "ti2v", prefix="model.diffusion_model.",
                         text_dim=4096)
    make_tiny_expert_pair(models_folder, "i2v", prefix="model.diffusion_model.", text_dim=4096)
    return models_folder


def load_model(name, **kwargs):
    loader = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()
    return loader.load(name, "fp32", "disabled", "main_device", "sdpa", **kwargs)[0]


def sample_node(pipeline, positive, negative, latent=None, width=64, height=32, num_frames=5, seed=7, cfg=5.0):
    sampler = PACKAGE.NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]()
    return sampler.sample(pipeline, positive, negative, width, height, num_frames, steps=3, cfg=cfg, shift=5.0,
                          seed=seed, scheduler="unipc", denoise=1.0, latent=latent)[0]


def wan22_image_latent(frames=2, height=2, width=4, seed=3):
    """Wan22ImageToVideoLatent's LATENT for one start image: raw latents on the image's latent frame,
    the Wan22 latents_mean elsewhere, noise_mask 0 on the image's frame."""
    from wanvideo.latent_format import WAN22
    samples = torch.tensor(WAN22.mean).view(1, 48, 1, 1, 1).repeat(1, 1, frames, height, width)
    samples[:, :, 0] = torch.randn(1, 48, height, width, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(1, 1, frames, height, width)
    mask[:, :, 0] = 0.0
    return {"samples": samples, "noise_mask": mask}


def test_ti2v_5B_text_to_video_uses_the_wan22_format(wan22_folder):
    from wanvideo.latent_format import WAN22, denormalize_latents
    pipeline = load_model("wan2.2_tiny_ti2v_5B.safetensors")
    fmt = pipeline.info.latent_format  # of the pack's own copy of the library: another class, the same values
    assert (fmt.name, fmt.channels, fmt.stride, fmt.size_multiple) == ("Wan22", 48, (4, 16, 16), 32)
    out = sample_node(pipeline, text_conditioning(1), text_conditioning(2))
    assert out["samples"].shape == (1, 48, 2, 2, 4) and torch.isfinite(out["samples"]).all()  # 64x32: 16x down
    noise = PACKAGE.wanvideo.api.make_noise((1, 48, 2, 2, 4), 7)
    cond = lambda seed: nodes_sampler.Conditioning(context=[text_conditioning(seed)[0][0][0]])
    direct = pipeline.generate(noise, cond(1), cond(2), steps=3, cfg=5.0, shift=5.0, scheduler="unipc", progress=False)
    assert relative_error(out["samples"], denormalize_latents(direct, WAN22)) <= 1e-6
    with pytest.raises(ValueError, match=r"width=48 is not valid: give a positive multiple of 32"):
        sample_node(pipeline, text_conditioning(1), text_conditioning(2), width=48)
    with pytest.raises(ValueError, match=r"takes \[B, 48, T, H/16, W/16\].*Wan22ImageToVideoLatent"):
        sample_node(pipeline, text_conditioning(1), text_conditioning(2), latent={"samples": torch.zeros(1, 16, 2, 4, 6)})


def test_ti2v_5B_image_to_video_from_wan22_image_to_video_latent(wan22_folder):
    from wanvideo.latent_format import WAN22, denormalize_latents, normalize_latents as normalize
    pipeline = load_model("wan2.2_tiny_ti2v_5B.safetensors")
    latent = wan22_image_latent()
    out = sample_node(pipeline, text_conditioning(1), text_conditioning(2), latent=latent)
    assert "noise_mask" not in out and out["samples"].shape == (1, 48, 2, 2, 4)
    # the start image's latent frame comes back as it went in; the rest is generated
    assert torch.allclose(out["samples"][:, :, 0], latent["samples"][:, :, 0], atol=1e-5)
    assert not torch.allclose(out["samples"][:, :, 1], latent["samples"][:, :, 1], atol=1e-2)
    # the same as the loop with Inpaint(normalised latent, mask)
    noise = PACKAGE.wanvideo.api.make_noise((1, 48, 2, 2, 4), 7)
    cond = lambda seed: nodes_sampler.Conditioning(context=[text_conditioning(seed)[0][0][0]])
    inpaint = nodes_sampler.Inpaint(normalize(latent["samples"], WAN22), latent["noise_mask"])
    direct = pipeline.generate(noise, cond(1), cond(2), steps=3, cfg=5.0, shift=5.0, scheduler="unipc",
                               progress=False, inpaint=inpaint)
    assert relative_error(out["samples"], denormalize_latents(direct, WAN22)) <= 1e-6
    plain = sample_node(pipeline, text_conditioning(1), text_conditioning(2), latent={"samples": latent["samples"]})
    assert not torch.allclose(plain["samples"], out["samples"])  # the mask changed the run


def test_a14b_i2v_pair_from_native_wan_image_to_video_without_clip(wan22_folder):
    pipeline = load_model("wan2.2_tiny_i2v_high_noise.safetensors",
                          low_noise_model="wan2.2_tiny_i2v_low_noise.safetensors")
    assert pipeline.info.image_embedding is False and pipeline.info.latent_format.name == "Wan21"
    extras = image_to_video_extras(frames=2)
    del extras["clip_vision_output"]  # the official template leaves it unconnected
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    run = lambda extras, seed=7: sample_node(pipeline, text_conditioning(1, extras=extras),
                                             text_conditioning(2, extras=extras), latent=latent, seed=seed)["samples"]
    first = run(extras)
    assert first.shape == (1, 16, 2, 4, 6) and torch.isfinite(first).all()
    assert torch.equal(run(extras), first)
    assert torch.equal(run(dict(extras, clip_vision_output=ClipVisionOutput(0))), first)  # ignored: no CLIP branch
    other_image = dict(extras, concat_latent_image=extras["concat_latent_image"] + 1)
    assert not torch.allclose(run(other_image), first)  # y reaches the model
    cond = nodes_sampler.comfy_to_conditioning(text_conditioning(0, extras=extras), "positive", "i2v", 1, (2, 4, 6),
                                               image_embedding=False)
    assert cond.clip_fea is None and cond.y.shape == (1, 20, 2, 4, 6)
    with pytest.raises(ValueError, match="WanImageToVideo"):
        run({})
