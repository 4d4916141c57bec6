"""data_parallel and block_distribution on CPU devices: the same videos as one device, and
graceful degradation when devices are unusable or run out of memory."""
import logging
import threading
import time

import pytest
import torch

import wanvideo.parallel as parallel
import wanvideo.parallel.load as parallel_load
from conftest import relative_error
from wanvideo.checkpoint import load_wan_model
from wanvideo.devices import DeviceOutOfMemoryError
from wanvideo.gpus import discovery
from wanvideo.parallel import MultiGPUWanModel, distribute_model_blocks, get_available_gpus, setup_multi_gpu_parallelism
from wanvideo.parallel.block_distribution import PipelinedBlockRunner, blocks_per_device_by_memory
from wanvideo.parallel.data_parallel import DataParallelWan, split_evenly
from wanvideo.pipeline import LoadSettings, load_pipeline
from wanvideo.sampling import Conditioning, make_noise

CPU = torch.device("cpu")
CPUS = [torch.device("cpu", i) for i in range(3)]  # distinct devices: data_parallel makes one replica each
SETTINGS = LoadSettings(base_precision="fp32")


def conditioning(model_type, batch, frames, seed):
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(batch, 257, 1280, generator=g) if model_type == "i2v" else None
    y = torch.randn(batch, 20, frames, 4, 6, generator=g) if model_type == "i2v" else None
    return Conditioning([torch.randn(5 + i, 32, generator=g) for i in range(batch)], clip, y)


def generate(pipeline, model_type, batch=1, cfg=4.0):
    noise = make_noise((batch, 16, 3, 4, 6), seed=11)
    return pipeline.generate(noise, conditioning(model_type, batch, 3, 1), conditioning(model_type, batch, 3, 2),
                             steps=3, cfg=cfg, shift=3.0, scheduler="unipc", progress=False)


def record_replica_calls(denoiser):
    """For each distinct replica of a data-parallel denoiser, the list that its forwards append to:
    (items of x, rows of clip_fea or None) per call."""
    calls = {}
    for replica in denoiser.replicas:
        if id(replica) not in calls:
            calls[id(replica)] = record = []
            replica.register_forward_pre_hook(lambda module, args, kwargs, record=record: record.append(
                (len(kwargs["x"]), None if kwargs["clip_fea"] is None else kwargs["clip_fea"].shape[0])),
                with_kwargs=True)
    return list(calls.values())


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """Single-device videos for t2v and i2v, batch 1 and 2."""
    out = {}
    for model_type in ("t2v", "i2v"):
        pipeline = load_pipeline(tiny_checkpoints[model_type][0], CPU, SETTINGS)
        for batch in (1, 2):
            out[model_type, batch] = generate(pipeline, model_type, batch)
    return out


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("strategy, devices, kwargs", [
    ("data_parallel", CPUS[:2], {}),
    ("data_parallel", CPUS, {}),
    ("block_distribution", [CPU, CPU], {}),
    ("block_distribution", [CPU, CPU, CPU], {"blocks_per_gpu": [2, 1, 1]}),
    ("block_distribution", [CPU, CPU], {"pipeline_branches": False}),
    ("block_distribution", [CPU, CPU], {"blocks_per_gpu": [2, 2], "blocks_to_swap_per_gpu": [1, 2]}),
])
def test_strategy_matches_single_device(tiny_checkpoints, reference, model_type, batch, strategy, devices, kwargs):
    pipeline = parallel.load_parallel_pipeline(tiny_checkpoints[model_type][0], strategy, settings=SETTINGS,
                                               devices=devices, **kwargs)
    calls = record_replica_calls(pipeline.denoiser) if strategy == "data_parallel" else None
    assert relative_error(generate(pipeline, model_type, batch), reference[model_type, batch]) <= 1e-5
    assert pipeline.denoiser.prefers_batched_cfg is kwargs.get("pipeline_branches", True)
    if calls is not None:  # one replica per device, each ran its share of cond + uncond at every step
        shares = [stop - start for start, stop in split_evenly(2 * batch, len(devices))]
        assert len(calls) == len(devices)
        for replica_calls, share in zip(calls, shares):
            assert replica_calls == [(share, share if model_type == "i2v" else None)] * (3 if share else 0)
    description = pipeline.describe()
    assert ("replica" in description) if strategy == "data_parallel" else ("blocks 0-" in description)
    pipeline.unload()


def test_pipeline_schedule_overlaps_branches():
    """GPipe order: at tick k stage s runs micro-batch k - s, so two stages work at once."""
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, tokens, ctx):
            calls.append((self.stage, int(tokens[0, 0, 0])))
            return tokens

    class Stage:
        def __init__(self, index):
            self.device, self.blocks = CPU, [Recorder(index)]

    class Ctx:
        def select(self, s):
            return self

        def to(self, *a, **k):
            return self

    tokens = torch.arange(3.0).view(3, 1, 1)
    PipelinedBlockRunner([Stage(0), Stage(1)])(None, tokens, Ctx())
    # tick k: stage 1 takes micro-batch k - 1 while stage 0 takes micro-batch k
    assert calls == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


class FakeReplica:
    """A stand-in replica that notes which items each forward got (x holds the item's index), how many
    forwards ran at once, and fails on demand."""
    patch_size = (1, 2, 2)

    def __init__(self, seconds=0.0, error=None):
        self.seconds, self.error = seconds, error
        self.calls, self.running, self.most_running, self.finished = [], 0, 0, 0
        self.lock = threading.Lock()

    def __call__(self, x, t, context, seq_len=None, clip_fea=None, y=None):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.seconds)
            if self.error is not None:
                raise self.error
            items = [int(u.flatten()[0]) for u in x]
            self.calls.append((items, clip_fea[:, 0].tolist(), t.tolist(), [int(c[0, 0]) for c in context]))
            return [u * 10 for u in x]
        finally:
            with self.lock:
                self.running -= 1
                self.finished += 1


def fake_batch(batch, images_per_item=2):
    """x, t, context and clip_fea whose entries for item i all hold i (clip rows: 100 i + image)."""
    x = [torch.full((2, 1, 2, 2), float(i)) for i in range(batch)]
    clip = torch.tensor([[100.0 * i + image] for i in range(batch) for image in range(images_per_item)])
    return x, torch.arange(batch, dtype=torch.float32), [torch.full((3, 4), float(i)) for i in range(batch)], clip


def test_data_parallel_waits_for_every_replica_before_raising():
    """A retry after a failure must not find a replica still running its last forward."""
    failing, slow = FakeReplica(error=RuntimeError("replica 0 failed (injected)")), FakeReplica(seconds=0.3)
    parallel_model = DataParallelWan([failing, slow], CPUS[:2])
    x, t, context, clip = fake_batch(2)
    with pytest.raises(RuntimeError, match="injected"):
        parallel_model(x, t, context, clip_fea=clip)
    assert slow.finished == 1 and slow.running == 0


def test_data_parallel_runs_a_repeated_replica_on_one_thread():
    """[cuda:0, cuda:1, cuda:0] (given as devices=): the replica of cuda:0 gets items 0 and 2 in one
    forward, never two forwards at once; every item comes back in its place, with its own clip rows."""
    shared, other = FakeReplica(seconds=0.1), FakeReplica(seconds=0.1)
    parallel_model = DataParallelWan([shared, other, shared], [CPUS[0], CPUS[1], CPUS[0]])
    x, t, context, clip = fake_batch(3)
    outputs = parallel_model(x, t, context, clip_fea=clip)
    assert [int(u.flatten()[0]) for u in outputs] == [0, 10, 20]
    assert shared.most_running == 1
    assert shared.calls == [([0, 2], [0.0, 1.0, 200.0, 201.0], [0.0, 2.0], [0, 2])]
    assert other.calls == [([1], [100.0, 101.0], [1.0], [1])]


def test_documented_model_arguments_and_functions(tiny_checkpoints):
    path = tiny_checkpoints["t2v"][0]
    plain = load_wan_model(path, base_precision="fp32")
    model = load_wan_model(path, base_precision="fp32")
    model.parallelism_type, model.gpu_ids = "block_distribution", None
    with torch.device("meta"):
        assert MultiGPUWanModel(parallelism_type="data_parallel", gpu_ids=[0, 1]).gpu_ids == [0, 1]
        with pytest.raises(ValueError, match="'pipeline' is not one of"):
            MultiGPUWanModel(parallelism_type="pipeline")
    distributed = setup_multi_gpu_parallelism(model, devices=[CPU, CPU])
    replicas = setup_multi_gpu_parallelism(load_wan_model(path, base_precision="fp32"), "data_parallel",
                                           devices=CPUS[:2])
    calls = record_replica_calls(replicas)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = [torch.randn(16, 3, 4, 6, generator=g) for _ in range(2)], torch.tensor([300.0, 800.0]), \
        [torch.randn(4, 32, generator=g), torch.randn(6, 32, generator=g)]
    with torch.no_grad():
        expected = plain(x, t, ctx)
        for strategy in (distributed, replicas):
            for out, ref in zip(strategy(x, t, ctx), expected):
                assert relative_error(out, ref) <= 1e-5
    assert calls == [[(1, None)], [(1, None)]]  # two replicas, one item each
    with pytest.raises(ValueError, match="load_parallel_pipeline"):
        setup_multi_gpu_parallelism(plain, "distributed", devices=[CPU])
    with pytest.raises(ValueError, match="at least one block"):
        distribute_model_blocks(load_wan_model(path, base_precision="fp32"), [CPU, CPU], [4, 0])


def test_available_gpus_follow_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_available_gpus() == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert get_available_gpus() == [0, 1, 2]


def test_blocks_split_in_proportion_to_memory():
    assert blocks_per_device_by_memory(40, [24, 12]) == [27, 13]
    assert blocks_per_device_by_memory(40, [16, 16, 16, 16]) == [10, 10, 10, 10]
    assert blocks_per_device_by_memory(30, [100, 1, 1]) == [30, 0, 0]   # the small ones are left out
    assert blocks_per_device_by_memory(40, [24, 12], limits=[20, 30]) == [20, 20]
    with pytest.raises(ValueError, match="hold at most 25 of the 40 blocks"):
        blocks_per_device_by_memory(40, [24, 12], limits=[20, 5])


def test_unusable_gpu_ids_are_dropped_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(discovery, "get_available_gpus", lambda: [0, 1])
    with caplog.at_level(logging.WARNING):
        assert parallel.resolve_devices("0, 5") == [torch.device("cuda", 0)]
    assert "GPU ids [5] are not usable" in caplog.text
    with pytest.raises(RuntimeError, match=r"None of the GPUs \[7\] is usable"):
        parallel.resolve_devices([7])


def fail_first_load(monkeypatch, loader_name, failing_device):
    """Make parallel.load.<loader_name> run out of memory on `failing_device` once, then load for real."""
    real, attempts = getattr(parallel_load, loader_name), []

    def flaky(path, device_or_map, settings, info):
        attempts.append(device_or_map)
        if len(attempts) == 1:
            raise DeviceOutOfMemoryError(f"Out of memory on {failing_device} (injected)", failing_device)
        return real(path, device_or_map, settings, info)

    monkeypatch.setattr(parallel_load, loader_name, flaky)


def test_out_of_memory_replica_is_dropped_and_replanned(tiny_checkpoints, reference, monkeypatch, caplog):
    fail_first_load(monkeypatch, "_load_replica", torch.device("cpu", 0))
    devices = [torch.device("cpu", 0), torch.device("cpu", 1)]
    with caplog.at_level(logging.WARNING):
        pipeline = parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], "data_parallel", settings=SETTINGS,
                                                   devices=devices)
    assert "Dropped cpu:0" in caplog.text and pipeline.denoiser.devices == [torch.device("cpu", 1)]
    assert relative_error(generate(pipeline, "t2v", 2), reference["t2v", 2]) <= 1e-5


def test_nothing_fits_gives_a_clear_error(tiny_checkpoints, monkeypatch):
    def always_oom(path, device_or_map, settings, info):
        device = device_or_map[""] if isinstance(device_or_map, dict) else device_or_map
        raise DeviceOutOfMemoryError("Out of memory (injected)", device)

    monkeypatch.setattr(parallel_load, "_load_replica", always_oom)
    monkeypatch.setattr(parallel_load, "_load_placed", always_oom)
    with pytest.raises(MemoryError, match="does not fit the GPUs even split by blocks"):
        parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], "data_parallel", settings=SETTINGS,
                                        devices=[torch.device("cpu", 0), torch.device("cpu", 1)])
    with pytest.raises(MemoryError, match="fits none of the GPUs"):
        parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], "data_parallel", settings=SETTINGS,
                                        devices=[torch.device("cpu", 0), torch.device("cpu", 1)],
                                        enable_block_distribution=False)


def test_block_distribution_drops_the_device_that_ran_out(tiny_checkpoints, reference, monkeypatch, caplog):
    fail_first_load(monkeypatch, "_load_placed", torch.device("cpu", 2))
    devices = [torch.device("cpu", i) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        pipeline = parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], "block_distribution",
                                                   settings=SETTINGS, devices=devices)
    assert "Dropped cpu:2" in caplog.text
    assert [s.device for s in pipeline.denoiser.block_runner.stages] == devices[:2]
    assert relative_error(generate(pipeline, "t2v", 2), reference["t2v", 2]) <= 1e-5


def test_distributed_through_the_common_entry_point(tiny_checkpoints, reference):
    """'distributed' from load_parallel_pipeline: two gloo workers sample the single-device video,
    the group survives between runs, and unload stops it."""
    import multiprocessing
    pipeline = parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], "distributed", settings=SETTINGS,
                                               devices=[CPU, CPU])
    try:
        assert "one worker per device" in pipeline.describe()
        assert relative_error(generate(pipeline, "t2v", 1), reference["t2v", 1]) <= 1e-5
        workers = [p.pid for p in multiprocessing.active_children() if p.name.startswith("wan-worker")]
        bad_y = Conditioning([torch.zeros(3, 32)], torch.zeros(1, 257, 1280), torch.zeros(1, 20, 2, 4, 6))
        with pytest.raises(ValueError, match="y has shape"):  # refused before it reaches the workers
            pipeline.generate(make_noise((1, 16, 3, 4, 6), 0), bad_y, steps=2, cfg=1.0)
        with pytest.raises(ValueError, match="multiples of 16"):
            pipeline.generate(make_noise((1, 16, 3, 5, 6), 0), conditioning("t2v", 1, 3, 1), steps=2, cfg=1.0)
        assert relative_error(generate(pipeline, "t2v", 2), reference["t2v", 2]) <= 1e-5
        assert [p.pid for p in multiprocessing.active_children() if p.name.startswith("wan-worker")] == workers
    finally:
        pipeline.unload()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("wan-worker")]
    with pytest.raises(RuntimeError, match="unloaded"):
        generate(pipeline, "t2v")


def test_benchmark_includes_the_in_process_strategies(tiny_checkpoints):
    import multi_gpu_utils
    rows = multi_gpu_utils.benchmark_multi_gpu_performance(
        tiny_checkpoints["t2v"][0], configs=["single_device", "data_parallel", "block_distribution"],
        devices=CPUS[:2], steps=1, width=64, height=64, num_frames=5, base_precision="fp32")
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["relative_error_vs_single"] <= 1e-5 for r in rows)


def test_no_gpu_auto_and_none_run_on_the_cpu(tiny_checkpoints, reference, monkeypatch):
    """What the Multi-GPU loader does on a machine without GPUs (as in a CPU-only ComfyUI)."""
    monkeypatch.setattr(discovery, "get_available_gpus", lambda: [])
    for strategy in ("auto", "none"):
        pipeline = parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], strategy, gpu_ids="0,1",
                                                   settings=SETTINGS)
        assert pipeline.device == CPU
        assert relative_error(generate(pipeline, "t2v", 1), reference["t2v", 1]) <= 1e-5
    with pytest.raises(RuntimeError, match="choose parallelism_type 'auto' or 'none'"):
        parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], "data_parallel", gpu_ids="0,1", settings=SETTINGS)


def test_loras_are_merged_by_every_strategy(tiny_checkpoints, tmp_path):
    """A LoRA gives the same video through each strategy as on one device (each distributed worker
    merges it from the file)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(9)
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_down.weight": torch.randn(4, 64, generator=g),
               "diffusion_model.blocks.1.self_attn.q.lora_up.weight": torch.randn(64, 4, generator=g),
               "diffusion_model.blocks.1.self_attn.q.alpha": torch.tensor(2.0)}, str(lora))
    settings = LoadSettings(base_precision="fp32", loras=[(str(lora), 0.7)])
    path = tiny_checkpoints["t2v"][0]
    expected = generate(load_pipeline(path, CPU, settings), "t2v")
    assert relative_error(expected, generate(load_pipeline(path, CPU, SETTINGS), "t2v")) > 1e-3  # it matters
    for strategy in ("data_parallel", "block_distribution", "distributed"):
        # distributed runs a worker process per entry, so [cpu, cpu] is two workers there
        devices = [CPU, CPU] if strategy == "distributed" else CPUS[:2]
        pipeline = parallel.load_parallel_pipeline(path, strategy, settings=settings, devices=devices)
        calls = record_replica_calls(pipeline.denoiser) if strategy == "data_parallel" else None
        try:
            assert relative_error(generate(pipeline, "t2v"), expected) <= 1e-5, strategy
            if calls is not None:  # both replicas ran, so both merged the LoRA
                assert len(calls) == 2 and all(calls)
        finally:
            pipeline.unload()


@pytest.mark.parametrize("strategy, kwargs", [("none", {}), ("data_parallel", {}), ("block_distribution", {}),
                                               ("block_distribution", {"blocks_to_swap_per_gpu": [1, 1]})])
def test_dropping_the_pipeline_frees_the_model(tiny_checkpoints, strategy, kwargs):
    """What happens when ComfyUI drops the loader's output: nothing keeps the weights alive."""
    import weakref
    pipeline = parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], strategy, settings=SETTINGS,
                                               devices=CPUS[:2], **kwargs)
    generate(pipeline, "t2v")
    models = [weakref.ref(m) for m in getattr(pipeline.denoiser, "replicas", [pipeline.denoiser])]
    assert len({id(ref()) for ref in models}) == (2 if strategy == "data_parallel" else 1)
    del pipeline
    assert all(ref() is None for ref in models)


def test_block_distribution_splits_by_free_memory_and_leaves_out_a_full_device(tiny_checkpoints, monkeypatch,
                                                                                caplog):
    block = 202_496  # bytes of one tiny fp32 block
    free = {0: 30 * block, 1: 10 * block, 2: block // 2}
    monkeypatch.setattr(parallel_load, "free_bytes", lambda device: free[device.index])
    monkeypatch.setattr(parallel_load, "_activation_reserve", lambda *args: 0)
    devices = [torch.device("cpu", i) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        pipeline = parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], "block_distribution",
                                                   settings=SETTINGS, devices=devices)
    assert "Dropped cpu:2" in caplog.text
    assert [(s.device, len(s.blocks)) for s in pipeline.denoiser.block_runner.stages] == [(devices[0], 3), (devices[1], 1)]
    free.update({0: block, 1: block, 2: block})
    with pytest.raises(MemoryError, match="hold at most 3 of the 4 blocks"):
        parallel.load_parallel_pipeline(tiny_checkpoints["t2v"][0], "block_distribution", settings=SETTINGS,
                                        devices=devices)
