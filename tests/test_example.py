"""The README's main command, example_multi_gpu_usage.py: defaults, one-line errors, and the .latent it
writes (the file ComfyUI's LoadLatent opens), all on CPU with the built-in tiny model."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import example_multi_gpu_usage as example
from conftest import run_main
from wanvideo import api
from wanvideo.latent_format import denormalize_latents, save_comfy_latent


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
