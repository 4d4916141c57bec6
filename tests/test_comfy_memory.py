"""Living inside ComfyUI's memory management (issue 14, item 17a): a pipeline steps aside (its device
memory back to the host) and comes back with the same video, for every strategy; and ComfyUI's
'Unload Models', or its own need for memory, reaches it through comfy_host's memory handles (a fake
comfy.model_management and comfy.model_patcher here; the real ComfyUI was driven by hand, see the
issue's note)."""
import gc
import importlib.util
import multiprocessing
import sys
import weakref

import pytest
import torch

import comfy_fake
from conftest import relative_error
from wanvideo.engine import BlockSwapSettings, get_block_swapper, parking
from wanvideo.parallel import load_parallel_pipeline
from wanvideo.pipeline import LoadSettings
from wanvideo.sampling import Conditioning, make_noise
from wanvideo.tiny import make_tiny_checkpoint

CPU = torch.device("cpu")
FP32 = LoadSettings(base_precision="fp32")
SWAP = LoadSettings(base_precision="fp32", block_swap=BlockSwapSettings(blocks_to_swap=3))


def generate(pipeline, batch=2):
    g = torch.Generator().manual_seed(3)
    text = lambda: [torch.randn(5 + i, 32, generator=g) for i in range(batch)]  # noqa: E731
    return pipeline.generate(make_noise((batch, 16, 3, 4, 6), seed=5), Conditioning(text()), Conditioning(text()),
                             steps=2, cfg=4.0, shift=3.0, progress=False)


def own_storage(tensor):
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


@pytest.fixture()
def cpu_stands_for_a_gpu(monkeypatch):
    """Stepping aside parks what holds device memory: on a GPU machine, every tensor on a GPU. Here
    the CPU stands for the GPU: every tensor with a storage of its own is parked, while what block
    swap keeps in host memory (views into one packed buffer per block; on the CPU on a GPU machine
    too) stays where it is."""
    monkeypatch.setattr(parking, "holds_device_memory", own_storage)


def models_and_swappers(pipeline):
    models = list({id(m): m for m in getattr(pipeline.denoiser, "replicas", [pipeline.denoiser])}.values())
    holders = [h for m in models for h in (m, *getattr(m.block_runner, "stages", ()))]
    return models, [s for s in map(get_block_swapper, holders) if s is not None]


IN_PROCESS = {
    "one device": ("none", [CPU], {}, FP32),
    "one device, block swap": ("none", [CPU], {}, SWAP),
    "one device, resting in RAM": ("none", [CPU], {},
                                   LoadSettings(base_precision="fp32", load_device="offload_device")),
    "data_parallel": ("data_parallel", [torch.device("cpu", 0), torch.device("cpu", 1)], {}, FP32),
    "block_distribution": ("block_distribution", [CPU, CPU], {}, FP32),
    "block_distribution, block swap": ("block_distribution", [CPU, CPU],
                                       dict(blocks_per_gpu=[2, 2], blocks_to_swap_per_gpu=[1, 2]), FP32),
}


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_step_aside_and_come_back_give_the_same_video(tiny_checkpoints, cpu_stands_for_a_gpu, name):
    strategy, devices, kwargs, settings = IN_PROCESS[name]
    pipeline = load_parallel_pipeline(tiny_checkpoints["t2v"][0], strategy, settings=settings, devices=devices,
                                      **kwargs)
    expected = generate(pipeline)
    models, swappers = models_and_swappers(pipeline)
    assert len(models) == (2 if strategy == "data_parallel" else 1) and len(swappers) == ("swap" in name) * len(devices)
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers()) if own_storage(t)]
    assert tensors and pipeline.memory_by_device()
    before = {id(t): t.untyped_storage().data_ptr() for t in tensors}

    pipeline.step_aside()
    assert pipeline.is_aside
    parked = {t.untyped_storage().data_ptr() for t in tensors}
    assert all(t.untyped_storage().data_ptr() != before[id(t)] for t in tensors)  # every one left its place ...
    assert len(parked) == 1  # ... for the one host buffer of its device
    assert all(s.slot_bytes == 0 for s in swappers)  # block swap's slot ring is freed too
    pipeline.step_aside()  # idempotent
    assert {t.untyped_storage().data_ptr() for t in tensors} == parked

    assert relative_error(generate(pipeline), expected) <= 1e-6  # generate comes back by itself
    assert not pipeline.is_aside and all(own_storage(t) for t in tensors)
    assert all(s.slot_bytes > 0 for s in swappers)
    pipeline.step_aside()
    pipeline.come_back()
    pipeline.come_back()  # idempotent
    assert relative_error(generate(pipeline), expected) <= 1e-6
    pipeline.step_aside()
    pipeline.unload()  # unloading an aside pipeline frees it as well
    assert pipeline.denoiser is None


def test_distributed_steps_aside_by_stopping_its_workers(tiny_checkpoints):
    workers = lambda: [p for p in multiprocessing.active_children() if p.name.startswith("wan-worker")]  # noqa: E731
    pipeline = load_parallel_pipeline(tiny_checkpoints["t2v"][0], "distributed", settings=FP32, devices=[CPU, CPU])
    try:
        expected = generate(pipeline, batch=1)
        assert set(pipeline.memory_by_device()) == {CPU} and len(workers()) == 2
        pipeline.step_aside()
        assert pipeline.is_aside and not workers()
        pipeline.step_aside()
        assert relative_error(generate(pipeline, batch=1), expected) <= 1e-5  # a fresh group
        assert not pipeline.is_aside and len(workers()) == 2
    finally:
        pipeline.unload()
    assert not workers()


GPU = torch.device("cuda", 0)
ON_GPU = {
    "one device": ("none", [GPU], {}, FP32),
    "one device, block swap": ("none", [GPU], {}, SWAP),
    "data_parallel": ("data_parallel", [GPU, GPU], {}, FP32),
    "block_distribution, block swap": ("block_distribution", [GPU, GPU],
                                       dict(blocks_per_gpu=[2, 2], blocks_to_swap_per_gpu=[1, 2]), FP32),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(ON_GPU))
def test_step_aside_returns_the_gpu_memory(tiny_checkpoints, name):
    """After step_aside the GPU holds nothing of the model: unloading then frees no more. (Measured
    after a run: cuBLAS keeps a workspace per thread in PyTorch's allocator, 33 MiB here, not ours.)"""
    strategy, devices, kwargs, settings = ON_GPU[name]
    pipeline = load_parallel_pipeline(tiny_checkpoints["t2v"][0], strategy, settings=settings, devices=devices,
                                      **kwargs)
    expected = generate(pipeline).cpu()
    held = pipeline.memory_by_device()[GPU]
    resident = torch.cuda.memory_allocated(GPU)
    pipeline.step_aside()
    aside = torch.cuda.memory_allocated(GPU)
    assert resident - aside >= held > 0  # the weights and block swap's slots left the GPU ...
    models, _ = models_and_swappers(pipeline)
    assert all(t.device.type == "cpu" for m in models for t in (*m.parameters(), *m.buffers()))
    assert {parked.host.mode for parked in pipeline._held.parked} <= {"registered", "pinned"}  # ... to pinned RAM
    assert relative_error(generate(pipeline).cpu(), expected) <= 1e-6
    assert torch.cuda.memory_allocated(GPU) == resident
    pipeline.step_aside()
    pipeline.unload()
    gc.collect()
    assert torch.cuda.memory_allocated(GPU) == aside  # nothing of the model was left behind


# --- ComfyUI's side: the memory handles in a fake model management --------------------------------

def load_package_in_fake_comfyui(name):
    """This repository imported as ComfyUI imports a custom node, with the fake ComfyUI modules in
    sys.modules (a fresh copy, so comfy_host sees them)."""
    root = __file__.rsplit("/tests/", 1)[0]
    spec = importlib.util.spec_from_file_location(name, f"{root}/__init__.py", submodule_search_locations=[root])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return package


@pytest.fixture()
def comfyui(tmp_path, monkeypatch):
    """(fake model_management, the package as ComfyUI loads it) with a tiny model in diffusion_models."""
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    make_tiny_checkpoint(folder / "wan_tiny_t2v.safetensors", "t2v", prefix="model.diffusion_model.", text_dim=4096)
    model_management = comfy_fake.install(monkeypatch, folder)
    name = "wanvideo_multigpu_pack_in_fake_comfyui"
    package = load_package_in_fake_comfyui(name)
    assert package.comfy_host.IN_COMFYUI
    yield model_management, package
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def sample(package, pipeline):
    g = torch.Generator().manual_seed(1)
    conditioning = lambda: [[torch.randn(1, 7, 4096, generator=g), {}]]  # noqa: E731
    return package.NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]().sample(
        pipeline, conditioning(), conditioning(), 48, 32, 5, 2, 4.0, 3.0, 0, "euler", 1.0)[0]["samples"]


def ours(model_management):
    return [m for m in model_management.current_loaded_models
            if type(m.model.model).__name__ == "WanVideoMultiGPUModel"]


def count_calls(monkeypatch, cls, method):
    """Record each call of cls.method (on the class: a patched instance would be kept alive)."""
    calls, real = [], getattr(cls, method)

    def spy(self):
        calls.append(method)
        return real(self)

    monkeypatch.setattr(cls, method, spy)
    return calls


def test_unload_models_makes_the_pipeline_step_aside_and_the_next_run_works(comfyui, monkeypatch):
    model_management, package = comfyui
    loader = package.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()
    (pipeline,) = loader.load("wan_tiny_t2v.safetensors", "fp32", "disabled", "main_device", "sdpa")
    assert [(m.device, m.model.model_size()) for m in ours(model_management)] == \
        [(CPU, pipeline.memory_by_device()[CPU])]  # registered at load, sized by its weights
    asides = count_calls(monkeypatch, type(pipeline), "step_aside")
    comebacks = count_calls(monkeypatch, type(pipeline), "come_back")
    first = sample(package, pipeline)
    assert len(ours(model_management)) == 1 and not asides

    model_management.unload_all_models()  # what POST /free {"unload_models": true} runs
    assert asides == ["step_aside"] and pipeline.is_aside and not ours(model_management)
    model_management.load_models_gpu(pipeline.memory_handles)  # ComfyUI reloading what it thinks in use
    assert pipeline.is_aside  # only our own run brings the model back

    second = sample(package, pipeline)
    assert torch.equal(first, second) and not pipeline.is_aside and len(ours(model_management)) == 1
    assert "come_back" in comebacks

    model_management.free_bytes[CPU] = 0  # ComfyUI needs memory for one of its own models
    model_management.free_memory(2**20, CPU)
    assert pipeline.is_aside and asides == ["step_aside"] * 2

    handle = weakref.ref(pipeline.memory_handles[0])
    model_management.free_bytes.clear()
    sample(package, pipeline)
    del pipeline  # the loader's output leaves ComfyUI's cache: the handles go, and the entries with them
    gc.collect()
    assert handle() is None and not ours(model_management)


def test_the_main_device_gets_a_sentinel_when_unload_all_frees_only_it(comfyui, monkeypatch):
    """Older ComfyUI (to Oct 2025) frees only the main device in unload_all_models: a model placed
    elsewhere gets a size-0 handle there, so that "Unload Models" reaches it."""
    model_management, package = comfyui
    monkeypatch.setattr(model_management, "get_torch_device", lambda: torch.device("cpu", 7))
    loader = package.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()
    monkeypatch.setattr(package.comfy_host, "main_device", lambda: CPU)
    (pipeline,) = loader.load("wan_tiny_t2v.safetensors", "fp32", "disabled", "main_device", "sdpa")
    assert sorted((str(m.device), m.model.model_size() > 0) for m in ours(model_management)) == \
        [("cpu", True), ("cpu:7", False)]
    model_management.unload_all_models()
    assert pipeline.is_aside


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unload_models_returns_the_gpu_to_where_it_was(comfyui, monkeypatch):
    """On a GPU, ComfyUI's "Unload Models" after a run leaves exactly what a first load-run-unload
    cycle left (the allocator's own workspaces): nothing of the model, its cache or its swap slots."""
    model_management, package = comfyui
    monkeypatch.setattr(model_management, "get_torch_device", lambda: GPU)
    monkeypatch.setattr(package.comfy_host, "main_device", lambda: GPU)
    loader = package.NODE_CLASS_MAPPINGS["WanMultiGPUModelLoader"]()

    def load_run_unload():
        (pipeline,) = loader.load("wan_tiny_t2v.safetensors", "fp32", "disabled", "main_device", "sdpa")
        sample(package, pipeline)
        held = torch.cuda.memory_allocated(GPU)
        model_management.unload_all_models()
        assert pipeline.is_aside
        gc.collect()
        torch.cuda.synchronize(GPU)
        return held, torch.cuda.memory_allocated(GPU)

    _, baseline = load_run_unload()  # the first run also creates cuBLAS' workspaces, which stay
    held, after = load_run_unload()
    assert held > baseline and after == baseline
