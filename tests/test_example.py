"""The README's main command, example_multi_gpu_usage.py: defaults, one-line errors, and the .latent it
writes (the file ComfyUI's LoadLatent opens), all on CPU with the built-in tiny models (Wan 2.1, and
with --tiny the Wan 2.2 TI2V-5B shape and an A14B expert pair)."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import example_multi_gpu_usage as example
from conftest import run_main
from wanvideo import api
from wanvideo.latent_format import WAN22, denormalize_latents, save_comfy_latent
from wanvideo.parallel import experts as placed_experts
from wanvideo.sampling.experts import HIGH_NOISE, LOW_NOISE
from wanvideo.tiny import make_tiny_checkpoint


def run_example(argv, capsys):
    return run_main(example.main, argv, capsys)


class Loaded(Exception):
    """Raised by a stand-in api.load: the run got as far as loading, with these arguments."""


@pytest.fixture()
def record_load(monkeypatch):
    """api.load replaced by a recorder that stops the run: what the example asked to load."""
    calls = []

    def load(path, parallelism_type="none", gpu_ids=None, settings=None, device=None, **plan_inputs):
        calls.append(dict(parallelism_type=parallelism_type, gpu_ids=gpu_ids, device=device, settings=settings))
        raise Loaded()
    monkeypatch.setattr(api, "load", load)
    return calls


def test_the_default_run_writes_a_latent_loadlatent_opens(tmp_path, capsys, monkeypatch):
    calls = []
    real_load = api.load
    monkeypatch.setattr(api, "load", lambda *args, **kwargs: calls.append((args, kwargs)) or real_load(*args, **kwargs))
    code, out, err = run_example(["--steps", "2", "--output", str(tmp_path)], capsys)
    assert code == 0, err
    assert calls[0][0][1] == "auto"  # the node's default, not 'none'
    path = tmp_path / example.LATENT_NAME
    assert str(path) in out and "LoadLatent" in out
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        latent = f.get_tensor("latent_tensor")
    assert latent.shape == (1, 16, 3, 48 // 8, 64 // 8) and latent.dtype == torch.float32  # 64x48, 9 frames


def test_save_comfy_latent_round_trip(tmp_path):
    """What ComfyUI's LoadLatent reads: 'latent_tensor' as float, multiplied by 1/0.18215 unless the
    'latent_format_version_0' marker is present; VAEDecode then wants raw (un-normalised) latents."""
    latents = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    path = save_comfy_latent(tmp_path / "video.latent", latents)
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    assert set(tensors) == {"latent_tensor", "latent_format_version_0"}
    assert tensors["latent_format_version_0"].numel() == 0  # a marker, as SaveLatent writes it
    stored = tensors["latent_tensor"]
    assert stored.shape == (2, 16, 3, 4, 6) and stored.dtype == torch.float32
    multiplier = 1.0 if "latent_format_version_0" in tensors else 1.0 / 0.18215  # LoadLatent's rule
    expected = denormalize_latents(latents.float())
    assert torch.allclose(stored.float() * multiplier, expected)
    # raw VAE space, not the model's: channel 7 has mean 1.5508 and std 2.0743 in the Wan 2.1 VAE
    assert torch.allclose(stored[:, 7], latents[:, 7].float() * 2.0743 + 1.5508, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 16, T, H, W\]"):
        save_comfy_latent(tmp_path / "bad.latent", torch.zeros(1, 4, 8, 8))
    # the Wan 2.2 VAE's 48 channels: denormalised with its own statistics
    wan22 = torch.randn(1, 48, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    with safe_open(str(save_comfy_latent(tmp_path / "wan22.latent", wan22)), framework="pt") as f:
        stored = f.get_tensor("latent_tensor")
    assert torch.allclose(stored[:, 5], wan22[:, 5] * WAN22.std[5] + WAN22.mean[5], atol=1e-5)


def read_latent(path):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latent_tensor")


def test_tiny_ti2v_5b_runs_in_the_wan22_latent_space(tmp_path, capsys, monkeypatch):
    loaded = []
    real_load = api.load
    monkeypatch.setattr(api, "load",
                        lambda path, *args, **kwargs: loaded.append(path) or real_load(path, *args, **kwargs))
    code, out, err = run_example(["--tiny", "wan2.2-ti2v-5b", "--steps", "2", "--output", str(tmp_path)], capsys)
    assert code == 0, err
    info = api.inspect_checkpoint(loaded[0])  # the model that ran: 48 channels in and out, Wan 2.2
    assert (info.config["in_dim"], info.config["out_dim"], info.family) == (48, 48, "2.2")
    assert "Wan 2.2 TI2V" in out and "Wan22 latent [1, 48, 3, 4, 6]" in out and "wan2.2_vae.safetensors" in out
    # 96x64 pixels, 9 frames through the Wan 2.2 VAE's 4x16x16: 48 x 3 x 4 x 6, raw (denormalised) latents
    assert read_latent(tmp_path / example.LATENT_NAME).shape == (1, 48, 3, 64 // 16, 96 // 16)


def official_switch_step(steps, shift, boundary):
    """The first low-noise step of the official Wan 2.2 loop, written out here: timesteps on
    linspace(1 - 1/1000, 0) shifted by `shift`, high-noise while int(t) >= boundary * 1000."""
    for i in range(steps):
        sigma = (1 - 1 / 1000) * (1 - i / steps)
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        if int(sigma * 1000) < boundary * 1000:
            return i
    return None


@pytest.fixture()
def expert_per_step(monkeypatch):
    """The expert each step of an A14B pair's run got from the pair (spied on the placed pair)."""
    record = []
    real = placed_experts._PlacedPair.before_step

    def before_step(self, step_index, sigmas):
        denoiser = real(self, step_index, sigmas)
        record.append(next(name for name, expert in self.experts.items() if expert is denoiser))
        return denoiser
    monkeypatch.setattr(placed_experts._PlacedPair, "before_step", before_step)
    return record


def test_tiny_a14b_pair_switches_experts_at_the_boundary(tmp_path, capsys, expert_per_step):
    code, out, err = run_example(["--tiny", "wan2.2-t2v-a14b", "--output", str(tmp_path / "official")], capsys)
    assert code == 0, err
    switch = official_switch_step(8, 12.0, 0.875)  # T2V-A14B: shift 12, boundary 0.875; 8 tiny steps
    assert switch == 6 and expert_per_step == [HIGH_NOISE] * switch + [LOW_NOISE] * (8 - switch)
    assert "high-noise + low-noise experts, boundary 0.875" in out
    assert "high-noise steps 0-5" in out and "low-noise steps 6-7" in out and "cfg 4 high-noise, 3 low-noise" in out
    official = read_latent(tmp_path / "official" / example.LATENT_NAME)
    assert official.shape == (1, 16, 3, 6, 8)
    # --boundary reaches the sampler: at 0.95 the low-noise expert (other weights) takes over earlier
    expert_per_step.clear()
    code, out, err = run_example(["--tiny", "wan2.2-t2v-a14b", "--boundary", "0.95", "--output",
                                  str(tmp_path / "early")], capsys)
    assert code == 0, err
    switch = official_switch_step(8, 12.0, 0.95)
    assert 0 < switch < 6 and expert_per_step == [HIGH_NOISE] * switch + [LOW_NOISE] * (8 - switch)
    assert not torch.allclose(read_latent(tmp_path / "early" / example.LATENT_NAME), official)


def test_a_checkpoints_own_size_rule_is_applied_once_its_header_is_read(tmp_path, capsys, record_load):
    path, _, _ = make_tiny_checkpoint(tmp_path / "wan2.2_tiny_ti2v_5B.safetensors", "ti2v", text_dim=4096)
    code, _, err = run_example(["--model", str(path), "--width", "80", "--height", "64", "--frames", "9",
                                "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and "width=80 is not valid" in err and "multiple of 32" in err, err
    assert not record_load


@pytest.fixture()
def embeddings(tmp_path):
    """Text-embedding files: the right width (4096, the tiny model's), a wrong one, and one without 'positive'."""
    files = {}
    for name, tensors in (("good", {"positive": torch.randn(1, 7, 4096), "negative": torch.randn(5, 4096)}),
                          ("narrow", {"positive": torch.randn(7, 768), "negative": torch.randn(5, 768)}),
                          ("unnamed", {"prompt": torch.randn(7, 4096)})):
        files[name] = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, files[name])
    (tmp_path / "a_file").write_text("not a folder")
    files["a_file"] = str(tmp_path / "a_file")
    return files


BAD_INPUTS = [
    (["--width", "65"], "width=65 is not valid", "64 or 80 are near"),
    (["--width", "0"], "width=0 is not valid"),
    (["--height", "-16"], "height=-16 is not valid"),
    (["--frames", "10"], "num_frames=10 is not valid", "9 or 13 are near"),
    (["--frames", "0"], "num_frames=0 is not valid"),
    (["--frames", "-3"], "num_frames=-3 is not valid"),
    (["--cfg", "-3"], "cfg must be a finite number of at least 1", "-3"),
    (["--cfg", "nan"], "cfg must be a finite number"),
    (["--steps", "0"], "steps must be a positive integer", "0"),
    (["--shift", "0"], "shift must be a positive number"),
    (["--seed", "-1"], "--seed", "-1 is too small"),
    (["--blocks-to-swap", "x"], "--blocks-to-swap", "'x' is not a whole number"),
    (["--scheduler", "ddim"], "--scheduler", "invalid choice"),
    (["--quantization", "int4"], "--quantization", "invalid choice"),
    (["--gpu-ids", "a,b"], "--gpu-ids a,b", "GPU id 'a' is not a whole number"),
    (["--gpu-ids", "0,,1"], "--gpu-ids 0,,1", "empty entry"),
    (["--device", "cpu", "--gpu-ids", "0"], "--device", "not both"),
    (["--device", "cpu", "--parallelism", "data_parallel"], "--device runs one device"),
    (["--device", "nonsense"], "'nonsense' is not a device"),
    (["--text-embeddings", "{narrow}"], "768 wide", "4096 wide"),
    (["--text-embeddings", "{unnamed}"], "no 'positive' tensor", "prompt"),
    (["--text-embeddings", "{a_file}"], "SafetensorError"),
    (["--output", "{a_file}"], "is a file: give a folder"),
    (["--model", "{good}"], "not a Wan"),
    (["--tiny", "wan3"], "--tiny", "invalid choice"),
    (["--tiny", "wan2.1-t2v", "--model", "{good}"], "--model", "--tiny", "not both"),
    (["--low-noise-model", "{good}"], "--low-noise-model needs --model"),
    (["--boundary", "0.5"], "--boundary applies to a Wan 2.2 A14B expert pair"),
    (["--tiny", "wan2.2-ti2v-5b", "--cfg-low-noise", "3"], "--cfg-low-noise applies to a Wan 2.2 A14B expert pair"),
    (["--boundary", "x"], "--boundary", "invalid float value"),
    (["--tiny", "wan2.2-t2v-a14b", "--boundary", "1.5"], "--boundary 1.5 is not in (0, 1)"),
    (["--tiny", "wan2.2-t2v-a14b", "--cfg-low-noise", "0.5"], "--cfg-low-noise: cfg must be", "0.5"),
    (["--tiny", "wan2.2-ti2v-5b", "--width", "80"], "width=80 is not valid", "multiple of 32"),
]


@pytest.mark.parametrize("argv_and_fragments", BAD_INPUTS, ids=lambda case: " ".join(case[0]))
def test_every_bad_input_is_one_line_and_exit_2(argv_and_fragments, embeddings, tmp_path, capsys, record_load):
    argv, *fragments = argv_and_fragments
    argv = [a.format(**embeddings) for a in argv]
    output = ["--output", str(tmp_path / "out")] if "--output" not in argv else []
    code, out, err = run_example(argv + output, capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("example_multi_gpu_usage.py: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert not record_load  # refused before anything was loaded


def test_gpu_ids_are_refused_when_missing_and_honoured_with_none(tmp_path, capsys, record_load, monkeypatch):
    # On a machine without the GPU (any CPU machine, or one with fewer GPUs): refused, not ignored.
    monkeypatch.setattr(api, "validate_gpu_setup", lambda ids: (False, "GPU 7 does not exist: this process sees 1 GPU"))
    code, _, err = run_example(["--gpu-ids", "7", "--output", str(tmp_path)], capsys)
    assert code == 2 and "--gpu-ids 7: GPU 7 does not exist" in err and not record_load
    # With GPUs there: 'none' runs on the one id given; several ids need a multi-GPU strategy.
    monkeypatch.setattr(api, "validate_gpu_setup", lambda ids: (True, "ok"))
    with pytest.raises(Loaded):
        example.main(["--parallelism", "none", "--gpu-ids", "1", "--output", str(tmp_path), "--debug"])
    assert record_load[-1]["device"] == torch.device("cuda", 1) and record_load[-1]["parallelism_type"] == "none"
    code, _, err = run_example(["--parallelism", "none", "--gpu-ids", "0,1", "--output", str(tmp_path)], capsys)
    assert code == 2 and "--parallelism none runs one GPU" in err
    with pytest.raises(Loaded):
        example.main(["--gpu-ids", "0,1", "--output", str(tmp_path), "--debug"])
    assert record_load[-1]["parallelism_type"] == "auto" and record_load[-1]["gpu_ids"] == [0, 1]


def test_a_cuda_device_on_a_cpu_build_is_said_in_words(tmp_path, capsys, record_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_example(["--device", "cuda:3", "--output", str(tmp_path)], capsys)
    assert code == 2 and "cuda:3" in err and "CUDA is not available here" in err, err
    assert "Torch not compiled with CUDA" not in err and not record_load


def test_a_multi_gpu_strategy_without_gpus_is_refused_up_front(tmp_path, capsys, record_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, _, err = run_example(["--parallelism", "data_parallel", "--output", str(tmp_path)], capsys)
    assert code == 2 and "needs CUDA GPUs" in err and "auto or none" in err and not record_load


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="cfg must be"):
        example.main(["--cfg", "-3", "--output", str(tmp_path), "--debug"])
