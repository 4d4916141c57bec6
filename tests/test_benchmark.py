"""wanvideo.benchmark on the CPU with the tiny model: the same inputs per strategy, progress, defaults."""
import json
import os

import pytest
import torch

from conftest import counted_collectives, relative_error
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


# --- the one-GPU projection of multi-GPU step time (issue 13, item 6) ---------------------------

def _projection_module():
    import importlib
    import sys
    from pathlib import Path
    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("projection")


@pytest.fixture(scope="module")
def dry_projection(tmp_path_factory):
    """`bench_multi_gpu.py --project --dry-run` once (tiny model, CPU), with a measured file beside it."""
    import contextlib
    import io
    import os
    projection = _projection_module()
    out = tmp_path_factory.mktemp("projection")
    measured = out / "measured.json"
    measured.write_text(json.dumps({"results": [
        {"config": "tiny_cfg5 1 GPU", "gpus": 1, "cfg": 5.0, "step_s": 0.010},
        {"config": "tiny_cfg5 distributed x2", "gpus": 2, "cfg": 5.0, "step_s": 0.005}]}))
    previous = os.environ.get("OUT")
    os.environ["OUT"] = str(out)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            rows = projection.main(["--dry-run", "--measured", str(measured)])
    finally:
        os.environ.pop("OUT") if previous is None else os.environ.__setitem__("OUT", previous)
    return projection, rows, printed.getvalue(), out


def test_projection_dry_run_writes_a_labelled_table_json_and_chart(dry_projection):
    projection, rows, printed, out = dry_projection
    assert "projection (not measured)" in printed
    table = [line for line in printed.splitlines() if line.startswith("| tiny_")]
    assert len(table) == len(rows) == 2 * 3 * 2  # 2 cases x (2, 4, 8) GPUs x (whole, sharded)
    assert {(r["case"], r["gpus"], r["shard_weights"]) for r in rows} == {
        (c, n, s) for c in ("tiny_cfg5", "tiny_cfg1") for n in (2, 4, 8) for s in (False, True)}
    # the measured 2-GPU figure and the projection's error stand beside the projected row
    (row,) = [line for line in table if line.startswith("| tiny_cfg5 | 2 |") and "| whole |" in line]
    assert "distributed 0.005 s (2.00x over its 1 GPU 0.010 s; measured.json): projection" in row and "% s/step" in row
    saved = json.loads((out / "projection.json").read_text())
    assert saved["info"]["label"] == "projection (not measured)" and len(saved["results"]) == len(rows)
    assert saved["measured"]["tiny_cfg5 x2"][0]["speedup"] == pytest.approx(2.0)
    assert (out / "projection.png").read_bytes()[:4] == b"\x89PNG"
    for r in rows:  # every projected step is the timed compute plus every byte over the link
        assert r["compute_s"] > 0 and r["one_gpu_s"] > 0
        for link, spec in projection.LINKS.items():
            link_s = sum(c["link_bytes"] for c in r["collectives"].values()) / (spec["effective_GBps"] * 1e9)
            assert r["links"][link]["step_s"] == pytest.approx(r["compute_s"] + link_s, rel=1e-12)
        assert (projection.FSDP_GATHER in r["collectives"]) == r["shard_weights"]


def test_the_projection_takes_its_link_figures_from_the_package_table():
    """One link table: the projection's datasheet figures are wanvideo/gpus/links.py's, its effective
    ones those times its own PROJECTION_EFFICIENCY; --link still replaces or adds a figure by label."""
    from wanvideo.gpus import links
    projection = _projection_module()
    assert set(projection.LINKS) == {"NVLink 4", "PCIe 5.0 x16", "PCIe 4.0 x16"}
    datasheet = {"NVLink 4": links.nvlink_gb_per_s((9, 0)),
                 "PCIe 5.0 x16": links.PCIE_LANE_GB_PER_S[5] * 16, "PCIe 4.0 x16": links.PCIE_LANE_GB_PER_S[4] * 16}
    for name, figure in datasheet.items():
        spec = projection.LINKS[name]
        assert spec["datasheet_GBps"] == pytest.approx(figure, abs=0.05)
        assert spec["effective_GBps"] == pytest.approx(figure * projection.PROJECTION_EFFICIENCY, abs=0.05)
    overridden = projection.parse_links(["NVLink 4=380", "Mine=12.5"])
    assert overridden["NVLink 4"]["effective_GBps"] == 380.0 and overridden["Mine"]["effective_GBps"] == 12.5
    assert overridden["PCIe 4.0 x16"] == projection.LINKS["PCIe 4.0 x16"]


def _closed_form_link_bytes(config, tokens, degrees, cfg, shard, element=4):
    """Bytes one rank moves per step, from the shapes alone (the math the projection must follow)."""
    import math
    from projection import fsdp_gather_bytes
    sp, u, r = degrees.sequence, degrees.ulysses, degrees.ring
    shard_len = -(-tokens // sp)
    heads = -(-config["num_heads"] // u) * u
    head_dim = config["dim"] // config["num_heads"]
    forwards = 2 if cfg != 1 and degrees.cfg == 1 else 1
    per_block = ((u - 1) / u * 4 * shard_len * heads * head_dim * element          # q,k,v packed + output back
                 + (r - 1) * 2 * shard_len * heads * head_dim * element)          # k,v around the ring
    per_forward = config["num_layers"] * per_block
    if sp > 1:
        per_forward += (sp - 1) * shard_len * 64 * element                       # the head's output gathered
        per_forward += (sp - 1) * shard_len if shard_len * sp != tokens else 0     # the key mask (uint8)
    total = forwards * per_forward
    if degrees.cfg == 2:
        total += math.prod((16, 3, 6, 8)) * 4                                     # the guided branch exchanged
    world = degrees.world_size
    total += 2 * 4 * (world - 1) / world                                          # the interrupt all-reduce
    if shard:
        total += forwards * (world - 1) * fsdp_gather_bytes(config, world, torch.float32)
    return total


def test_projected_bytes_follow_the_math_and_the_time_falls_only_where_it_should(dry_projection):
    projection, rows, _, _ = dry_projection
    from wanvideo.parallel.distributed.topology import choose_degrees
    config = dict(model_type="t2v", in_dim=16, **projection.SIZES["tiny"])
    by_key = {}
    for r in rows:
        degrees = choose_degrees(r["gpus"], config["num_heads"], use_cfg=r["cfg"] != 1)
        counted = sum(c["link_bytes"] for c in r["collectives"].values())
        assert counted == pytest.approx(_closed_form_link_bytes(config, r["tokens"], degrees, r["cfg"],
                                                                r["shard_weights"]), rel=1e-9), r
        by_key[r["case"], r["gpus"], r["shard_weights"]] = r
    # Ulysses' all-to-all shrinks with the shard (cfg 1: ulysses 2 at 2, 4 and 8 GPUs, the ring grows);
    # the head's gather and the weight gathers grow with N towards the whole tensor
    def volume(n, name, shard=False):
        return by_key["tiny_cfg1", n, shard]["collectives"].get(name, {}).get("link_bytes", 0)
    assert volume(2, "all_to_all_single") > volume(4, "all_to_all_single") > volume(8, "all_to_all_single")
    assert volume(2, "batch_isend_irecv") == 0 < volume(4, "batch_isend_irecv") < volume(8, "batch_isend_irecv")
    assert volume(2, "fsdp_all_gather", True) < volume(4, "fsdp_all_gather", True) < volume(8, "fsdp_all_gather", True)
    # Time: with compute that halves per doubling, an ideal link makes every layout faster with N; a slow
    # link makes a layout faster only where its bytes per rank fall (here: none of the sharded ones)
    ideal, slow = {"ideal": dict(effective_GBps=1e12)}, {"slow": dict(effective_GBps=1e-6)}
    for case in ("tiny_cfg5", "tiny_cfg1"):
        for shard in (False, True):
            steps = {}
            for link in (ideal, slow):
                name = next(iter(link))
                steps[name] = [projection.project(dict(by_key[case, n, shard], compute_s=1.0 / n), 1.0, link)[name]
                               ["step_s"] for n in (2, 4, 8)]
            assert steps["ideal"][0] > steps["ideal"][1] > steps["ideal"][2]
            link_bytes = [sum(c["link_bytes"] for c in by_key[case, n, shard]["collectives"].values())
                          for n in (2, 4, 8)]
            for i in range(2):
                assert (steps["slow"][i + 1] < steps["slow"][i]) == (link_bytes[i + 1] < link_bytes[i])
            if shard:
                assert steps["slow"][0] < steps["slow"][1] < steps["slow"][2]


# The stand-ins' byte counts against real gloo ranks: the collectives counted through wrappers

LAYOUTS = [((2, 2, 1), 5.0, False), ((1, 2, 2), 1.0, False), ((2, 1, 2), 5.0, True)]  # (cfg, ulysses, ring), cfg, shard


FSDP_GATHERS = {"all_gather_single", "all_gather_into_tensor"}  # what FSDP2's weight gathers call


def _counting_rank(rank, world_size, port, out_folder):
    import os
    import torch.distributed as dist
    projection = _projection_module()
    from wanvideo.parallel.distributed.cfg_parallel import GuidedVelocityModel
    from wanvideo.parallel.distributed.sequence_parallel import apply_sequence_parallel
    from wanvideo.parallel.distributed.sharding import shard as shard_model
    from wanvideo.parallel.distributed.topology import ParallelDegrees, ParallelGroups
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    config = dict(model_type="t2v", in_dim=16, **projection.SIZES["tiny"])
    results = []
    for (cfg_degree, ulysses, ring), cfg, shard in LAYOUTS:
        work = projection.Workload(config, (16, 3, 6, 8), 512, cfg, torch.device("cpu"), torch.float32)
        model = projection.build_blocks_model(config, config["num_layers"], work.device, work.dtype)
        if shard:
            shard_model(model, work.device, prefetch=True)
        groups = ParallelGroups(ParallelDegrees(cfg_degree, ulysses, ring))
        apply_sequence_parallel(model, groups)
        x, t, positive, negative = projection._inputs(work)
        guided = GuidedVelocityModel(model, groups, negative, cfg)
        with torch.no_grad():
            guided(x, t, positive)  # a first step: any one-off collective stays out of the count
            with counted_collectives() as log:
                guided(x, t, positive)
                dist.all_reduce(torch.zeros(1, dtype=torch.int32), op=dist.ReduceOp.MAX)  # WorkerSession.any_rank
        results.append(projection.summarize([("fsdp_all_gather" if name in FSDP_GATHERS else name, sent, size)
                                             for name, _, sent, size in log]))
    with open(os.path.join(out_folder, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_stand_in_bytes_per_collective_equal_a_counted_run_of_real_gloo_ranks(tmp_path):
    import torch.multiprocessing as torch_mp
    from conftest import free_port
    projection = _projection_module()
    from wanvideo.parallel.distributed.topology import ParallelDegrees
    world = 4
    torch_mp.start_processes(_counting_rank, args=(world, free_port(), str(tmp_path)), nprocs=world,
                             start_method="fork")
    counted = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    config = dict(model_type="t2v", in_dim=16, **projection.SIZES["tiny"])
    with projection.StandInCollectives() as stand_ins, projection.world_of_one(torch.device("cpu")):
        for index, ((cfg_degree, ulysses, ring), cfg, shard) in enumerate(LAYOUTS):
            degrees = ParallelDegrees(cfg_degree, ulysses, ring)
            work = projection.Workload(config, (16, 3, 6, 8), 512, cfg, torch.device("cpu"), torch.float32)
            for rank in range(world):  # every rank's share, the whole model, counted by the stand-ins
                _, mine = projection.rank_step(work, degrees, config["num_layers"], False, stand_ins, rank=rank,
                                               iters=0)
                real = {k: v for k, v in counted[rank][index].items() if k != projection.FSDP_GATHER}
                assert {k: (v["calls"], v["bytes"]) for k, v in mine.items()} == \
                    {k: (v["calls"], v["bytes"]) for k, v in real.items()}, (degrees, rank)
                assert all(mine[k]["link_bytes"] == pytest.approx(real[k]["link_bytes"]) for k in real)
            # rank 0 as the projection reports it: two block counts extrapolated, FSDP's gathers from the shapes
            measured = projection.measure_rank(work, degrees, shard, (1, 2), 1, stand_ins)["collectives"]
            real = counted[0][index]
            assert {k: (v["calls"], v["bytes"]) for k, v in measured.items()} == \
                {k: (v["calls"], v["bytes"]) for k, v in real.items()}, degrees
            assert (projection.FSDP_GATHER in real) == shard


def test_bench_multi_gpu_dry_run_runs_each_case_once_per_attention_mode(tmp_path):
    """`bench_multi_gpu.py --dry-run --attention sdpa,auto` (tiny model, CPU devices): each mode gets its
    own one-device reference and distributed rows, labelled by mode, each as exact as its reference."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_multi_gpu.py"
    run = lambda *args: subprocess.run([sys.executable, str(script), "--dry-run", "--cases", "1.3B_480p_cfg1",
                                        "--steps", "1", *args], capture_output=True, text=True,
                                       env=dict(os.environ, OUT=str(tmp_path)), timeout=600)
    done = run("--attention", "sdpa,auto")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "multi_gpu.json").read_text())["results"]
    assert [r["config"] for r in rows] == [f"1.3B_480p_cfg1{label} {config}" for label in ("", "_auto")
                                           for config in ("1 GPU", "distributed x2", "distributed x4")]
    assert all("error" not in r for r in rows), rows
    assert all(r["rel_err_vs_1gpu"] <= 1e-5 for r in rows if r["config"].endswith(("x2", "x4")))
    refused = run("--attention", "sdpa,sage")
    assert refused.returncode == 2 and "unknown attention mode 'sage'" in refused.stderr
