"""Lifetimes of a loaded pipeline (issue 14, items 2-4): what 'auto' plans with block swap or
compile, what unloading uploads, and what dropping a pipeline without unload() frees."""
import gc
import weakref

import pytest
import torch

import wanvideo.parallel.load as parallel_load
import wanvideo.pipeline as pipeline_module
from wanvideo import inspect_checkpoint
from wanvideo.engine import BlockSwapper, BlockSwapSettings
from wanvideo.gpus import discovery
from wanvideo.parallel import load_parallel_pipeline
from wanvideo.parallel.plan import plan_parallelism
from wanvideo.pipeline import LoadSettings, load_pipeline
from wanvideo.sampling import Conditioning, make_noise

CPU = torch.device("cpu")
GIB = 2**30
SWAP = LoadSettings(base_precision="fp32", block_swap=BlockSwapSettings(blocks_to_swap=3))


def eight_gpus():
    """Eight 80 GB GPUs: for the tiny model at 832x480, 81 frames, the planner picks 'distributed'."""
    return [dict(index=i, name=f"GPU{i}", total_memory=80 * GIB, free_memory=79 * GIB,
                 peers=[j for j in range(8) if j != i]) for i in range(8)]


def generate(pipeline):
    g = torch.Generator().manual_seed(3)
    return pipeline.generate(make_noise((1, 16, 3, 4, 6), seed=5), Conditioning([torch.randn(5, 32, generator=g)]),
                             Conditioning([torch.randn(4, 32, generator=g)]), steps=2, cfg=4.0, shift=3.0,
                             progress=False)


# --- item 2: auto with block swap or torch.compile --------------------------------------------------

@pytest.mark.parametrize("asked, named", [(dict(block_swap=True), "block swap"),
                                          (dict(torch_compile=True), "torch.compile"),
                                          (dict(block_swap=True, torch_compile=True), "block swap and torch.compile")])
def test_planner_leaves_distributed_out_when_block_swap_or_compile_is_asked(tiny_checkpoints, asked, named):
    info = inspect_checkpoint(str(tiny_checkpoints["t2v"][0]))
    assert plan_parallelism(info, eight_gpus())["parallelism_type"] == "distributed"  # without them
    config = plan_parallelism(info, eight_gpus(), **asked)
    assert config["parallelism_type"] == "data_parallel" and config["gpu_ids"] == [0, 1]
    assert f"do not combine with {named}" in config["reason"] and "distributed strategy" in config["reason"]


@pytest.mark.parametrize("settings", [SWAP, LoadSettings(base_precision="fp32", compile_args={})])
def test_auto_tells_the_planner_about_block_swap_and_compile(tiny_checkpoints, monkeypatch, settings):
    """The loader's 'auto' on eight (injected) GPUs: the plan it loads is one the settings can run,
    not 'distributed', which would raise "does not combine with block swap or torch.compile"."""
    monkeypatch.setattr(discovery, "get_available_gpus", lambda: list(range(8)))
    monkeypatch.setattr(discovery, "get_gpu_info", lambda: eight_gpus())
    real_planner, plans = parallel_load.setup_optimal_parallelism, []

    class Planned(Exception):
        pass

    def plan_then_stop(path, **inputs):  # nothing can load on these GPUs: stop once the plan is made
        plans.append(real_planner(path, **inputs))
        raise Planned

    monkeypatch.setattr(parallel_load, "setup_optimal_parallelism", plan_then_stop)
    with pytest.raises(Planned):
        load_parallel_pipeline(tiny_checkpoints["t2v"][0], "auto", settings=settings)
    assert plans[0]["parallelism_type"] == "data_parallel", plans[0]["reason"]
    with pytest.raises(Planned):
        load_parallel_pipeline(tiny_checkpoints["t2v"][0], "auto", settings=LoadSettings(base_precision="fp32"))
    assert plans[1]["parallelism_type"] == "distributed"


# --- item 3: unloading a block-swapped model uploads nothing ----------------------------------------

@pytest.fixture()
def removals(monkeypatch):
    """Where each BlockSwapper.remove was asked to restore the swapped blocks (None: the compute device)."""
    calls, real_remove = [], BlockSwapper.remove

    def remove(self, restore_device=None):
        calls.append(None if restore_device is None else torch.device(restore_device))
        return real_remove(self, restore_device)

    monkeypatch.setattr(BlockSwapper, "remove", remove)
    return calls


def test_unload_restores_no_swapped_block_to_the_gpu(tiny_checkpoints, removals):
    pipeline = load_pipeline(tiny_checkpoints["t2v"][0], CPU, SWAP)
    generate(pipeline)
    pipeline.unload()
    assert removals == [CPU]  # the default (the compute device) would upload every swapped block first


def test_unloading_block_distribution_restores_no_swapped_block(tiny_checkpoints, removals):
    pipeline = load_parallel_pipeline(tiny_checkpoints["t2v"][0], "block_distribution",
                                      settings=LoadSettings(base_precision="fp32"), devices=[CPU, CPU],
                                      blocks_per_gpu=[2, 2], blocks_to_swap_per_gpu=[1, 2])
    generate(pipeline)
    pipeline.unload()
    assert removals == [CPU, CPU]


# --- item 4: dropping a pipeline that was never unloaded ----------------------------------------------

def test_dropping_a_pipeline_runs_its_cleanups_and_frees_the_model(tiny_checkpoints, removals, monkeypatch):
    """What ComfyUI does when the loader's output leaves its cache: no unload(), just the last
    reference gone. The cleanups run (block swap removed, without an upload), and the memory is
    released once the model is gone, not while it is still alive."""
    model_alive_at_release = []
    monkeypatch.setattr(pipeline_module, "release_memory", lambda: model_alive_at_release.append(model() is not None))
    pipeline = load_pipeline(tiny_checkpoints["t2v"][0], CPU, SWAP)
    generate(pipeline)
    ran = []
    pipeline.add_cleanup(lambda: ran.append("cleanup"))
    model, dropped = weakref.ref(pipeline.denoiser), weakref.ref(pipeline)
    del pipeline
    assert dropped() is None  # nothing (the finalizer included) keeps the pipeline alive
    gc.collect()
    assert ran == ["cleanup"] and removals == [CPU]
    assert model() is None and model_alive_at_release == [False]


def test_unload_then_drop_releases_once(tiny_checkpoints):
    pipeline = load_pipeline(tiny_checkpoints["t2v"][0], CPU, LoadSettings(base_precision="fp32"))
    ran = []
    pipeline.add_cleanup(lambda: ran.append("cleanup"))
    pipeline.unload()
    pipeline.unload()
    del pipeline
    gc.collect()
    assert ran == ["cleanup"]
