"""wanvideo.benchmark on the CPU with the tiny model: the same inputs per strategy, progress, defaults."""
import json

import pytest
import torch

from conftest import relative_error
from wanvideo import benchmark as bench

SMALL = dict(width=64, height=48, num_frames=5, base_precision="fp32")


def test_benchmark_on_cpu_compares_strategies_on_the_same_inputs(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["t2v"][0]
    table = bench.benchmark_multi_gpu_performance(path, configs=["single_device", {"strategy": "block_swap",
                                                  "name": "swap 3", "blocks_to_swap": 3}], steps=2,
                                                  devices="cpu", output_dir=tmp_path, **SMALL)
    single, swap = table
    assert single["status"] == swap["status"] == "ok", table
    assert single["speedup_vs_single"] == 1.0 and single["relative_error_vs_single"] == 0.0
    assert swap["config"] == "swap 3" and swap["settings"]["blocks_to_swap"] == 3
    assert swap["relative_error_vs_single"] <= 1e-5
    assert len(single["step_seconds"]) == 2 and single["seconds_per_step"] > 0
    assert single["peak_memory_per_gpu"] == {}  # CPU: no GPU memory
    saved = json.loads((tmp_path / "benchmark_results.json").read_text())
    assert [r["config"] for r in saved["results"]] == ["single_device", "swap 3"] and "t2v" in saved["model"]
    assert (tmp_path / "benchmark_chart.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_output_equals_a_plain_forward(tiny_checkpoints, monkeypatch):
    """What the benchmark runs is the model's forward on its inputs: check the last step against one."""
    from wanvideo import load_wan_model
    path = tiny_checkpoints["i2v"][0]
    captured = {}

    def capture(model_path, devices, settings):
        model = load_wan_model(model_path, "cpu", "fp32")

        def step(inputs):
            captured["inputs"], captured["output"] = inputs, model(**inputs)
            return captured["output"]
        return bench.BenchmarkRunnable(step, devices[:1])

    monkeypatch.setitem(bench.BENCHMARK_STRATEGIES, "capture", bench.BenchmarkStrategy(capture))
    (row,) = bench.benchmark_multi_gpu_performance(path, configs=["capture"], steps=1, devices="cpu", **SMALL)
    assert row["status"] == "ok"
    inputs = captured["inputs"]
    assert len(inputs["x"]) == 2 and inputs["clip_fea"].shape == (2, 257, 1280)  # cond + uncond, i2v extras
    assert torch.equal(inputs["x"][0], inputs["x"][1]) and not torch.equal(inputs["context"][0], inputs["context"][1])
    reference = load_wan_model(path, "cpu", "fp32")(**inputs)
    assert relative_error(captured["output"][0], reference[0]) <= 1e-5


def test_strategies_register_and_fail_or_skip_cleanly(tiny_checkpoints, monkeypatch):
    def missing(model_path, devices, settings):
        import wanvideo.parallel.not_written_yet  # noqa: F401

    def broken(model_path, devices, settings):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(bench, "BENCHMARK_STRATEGIES", dict(bench.BENCHMARK_STRATEGIES))
    bench.register_benchmark_strategy("missing", missing)
    bench.register_benchmark_strategy("broken", broken)
    bench.register_benchmark_strategy("two_gpus", min_devices=2)(broken)
    table = bench.benchmark_multi_gpu_performance(tiny_checkpoints["t2v"][0], configs=["missing", "broken", "two_gpus"],
                                                  steps=1, devices="cpu", **SMALL)
    status = {r["config"]: (r["status"], r["note"]) for r in table}
    assert status["missing"][0] == "skipped" and "not_written_yet" in status["missing"][1]
    assert status["broken"] == ("failed", "RuntimeError: out of cheese")
    assert status["two_gpus"][0] == "skipped" and "needs 2 devices" in status["two_gpus"][1]
    assert all(r["speedup_vs_single"] is None for r in table)


def test_benchmark_rejects_unknown_strategies_and_absent_gpus(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["t2v"][0]
    with pytest.raises(ValueError, match="'warp_drive'.*single_device"):
        bench.benchmark_multi_gpu_performance(path, configs=["warp_drive"], devices="cpu", **SMALL)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="devices='cpu'"):
        bench.benchmark_multi_gpu_performance(path, devices="0,1", **SMALL)


def test_a_gpu_index_beyond_the_machine_is_refused_before_loading(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"cuda:3 does not exist.*sees 1 GPU"):
        bench.benchmark_multi_gpu_performance(tiny_checkpoints["t2v"][0], devices="cuda:3", **SMALL)


# --- the one load sequence -----------------------------------------------------------------------

def test_built_in_strategies_load_through_the_pipeline(tiny_checkpoints, monkeypatch):
    """single_device and block_swap use load_prepared_model (LoRAs, block swap, fp8 fast, compile in
    one order) and release a swapper to the CPU: no upload of the swapped blocks on the way out."""
    import wanvideo.pipeline as pipeline
    loads, removals = [], []
    original = pipeline.load_prepared_model

    def spy(path, device, settings, info=None):
        model, info, swapper = original(path, device, settings, info)
        loads.append((torch.device(device), settings))
        if swapper is not None:
            remove = swapper.remove
            swapper.remove = lambda **kwargs: (removals.append(kwargs), remove(**kwargs))
        return model, info, swapper

    monkeypatch.setattr(pipeline, "load_prepared_model", spy)
    table = bench.benchmark_multi_gpu_performance(tiny_checkpoints["t2v"][0], configs=["single_device", "block_swap"],
                                                  steps=1, warmup_steps=0, devices="cpu", **SMALL)
    assert [r["status"] for r in table] == ["ok", "ok"], table
    (single_device, single), (swap_device, swap) = loads
    assert single_device == swap_device == torch.device("cpu")
    assert single.base_precision == swap.base_precision == "fp32" and single.block_swap is None
    from wanvideo.checkpoint import inspect_checkpoint
    assert swap.block_swap.blocks_to_swap == inspect_checkpoint(tiny_checkpoints["t2v"][0]).num_layers // 2 == 2
    assert removals == [{"restore_device": "cpu"}]
    assert table[1]["relative_error_vs_single"] <= 1e-5


# --- progress and defaults (issue 14, item 12) ---------------------------------------------------

def test_progress_reports_each_configuration_as_it_starts_and_ends(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(bench, "BENCHMARK_STRATEGIES", dict(bench.BENCHMARK_STRATEGIES))
    bench.register_benchmark_strategy("two_gpus", min_devices=2)(lambda *args: None)
    events = []
    table = bench.benchmark_multi_gpu_performance(
        tiny_checkpoints["t2v"][0], configs=["single_device", "two_gpus"], steps=1, devices="cpu",
        progress=lambda index, total, row: events.append((index, total, row["config"], row["status"],
                                                          bench.format_progress(index, total, row))), **SMALL)
    assert [e[:4] for e in events] == [(1, 2, "single_device", "running"), (1, 2, "single_device", "ok"),
                                       (2, 2, "two_gpus", "running"), (2, 2, "two_gpus", "skipped")]
    lines = [e[4] for e in events]
    assert lines[0].startswith("[1/2] single_device: running 1 warm-up + 1 timed steps, 64x48, 5 frames, fp32")
    assert lines[1] == (f"[1/2] single_device: ok on cpu, {table[0]['seconds_per_step']:.3f} s/step "
                        f"({table[0]['seconds']:.1f} s with loading)")
    assert lines[3] == "[2/2] two_gpus: skipped: needs 2 devices, 1 given"
    assert table[0]["seconds"] >= table[0]["seconds_per_step"] > 0


def test_cpu_devices_default_to_a_small_fp32_workload(tiny_checkpoints, caplog):
    with caplog.at_level("INFO", logger="wanvideo.benchmark"):
        (row,) = bench.benchmark_multi_gpu_performance(tiny_checkpoints["t2v"][0], configs=["single_device"], steps=1,
                                                       warmup_steps=0, devices="cpu")
    settings = row["settings"]
    assert row["status"] == "ok"
    assert (settings["width"], settings["height"], settings["num_frames"], settings["base_precision"]) == \
        (64, 48, 5, "fp32")
    assert "CPU devices: 64x48 pixels, 5 frames, fp32" in caplog.text
    (row,) = bench.benchmark_multi_gpu_performance(tiny_checkpoints["t2v"][0], configs=["single_device"], steps=1,
                                                   warmup_steps=0, devices="cpu", width=32, base_precision="bf16")
    assert (row["settings"]["width"], row["settings"]["height"], row["settings"]["base_precision"]) == (32, 48, "bf16")


def test_gpu_devices_keep_the_480p_workload():
    assert bench.benchmark_defaults("0,1") == dict(width=832, height=480, num_frames=81, base_precision="bf16")
    assert bench.benchmark_defaults([torch.device("cpu"), torch.device("cpu")])["base_precision"] == "fp32"
    assert bench.benchmark_defaults(["cpu", "cuda:0"])["width"] == 832  # any GPU: the GPU workload


@pytest.mark.parametrize("sizes,message", [
    (dict(width=65), "width=65 is not valid: give a positive multiple of 16"),
    (dict(height=0), "height=0 is not valid"),
    (dict(width=-64), "width=-64 is not valid"),
    (dict(num_frames=10), r"num_frames=10 is not valid: give 4n \+ 1 frames"),
    (dict(num_frames=0), "num_frames=0 is not valid"),
    (dict(steps=0), "steps=0"),
    (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(batch_size=0), "batch_size=0 is not valid"),
    (dict(blocks_to_swap=-2), "blocks_to_swap=-2 is negative"),
])
def test_sizes_and_counts_are_checked_before_anything_loads(sizes, message, tmp_path):
    missing = tmp_path / "not_read.safetensors"  # the arguments are refused before the file is opened
    with pytest.raises(ValueError, match=message):
        bench.benchmark_multi_gpu_performance(missing, devices="cpu", **{**SMALL, **sizes})


def test_a_per_configuration_override_is_checked_too(tiny_checkpoints):
    with pytest.raises(ValueError, match="width=40"):
        bench.benchmark_multi_gpu_performance(tiny_checkpoints["t2v"][0], devices="cpu",
                                              configs=[{"strategy": "single_device", "width": 40}], **SMALL)


def test_an_output_dir_that_is_a_file_fails_before_the_benchmark(tiny_checkpoints, tmp_path, monkeypatch):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    monkeypatch.setitem(bench.BENCHMARK_STRATEGIES, "single_device",
                        bench.BenchmarkStrategy(lambda *args: pytest.fail("ran before the output folder was checked")))
    with pytest.raises(ValueError, match="output_dir .*results.txt' is a file: give a folder"):
        bench.benchmark_multi_gpu_performance(tiny_checkpoints["t2v"][0], configs=["single_device"], devices="cpu",
                                              output_dir=target, **SMALL)
