"""Weight sharding for the distributed strategy (FSDP2 over gloo on CPU): the sharded model computes
what the unsharded one and the single process compute (fp32, t2v and i2v, CFG parallel, Ulysses,
ring; LoRA merged before sharding; bf16 and fp8 storage), each rank holds about 1/N of the weights
and reads the file one tensor at a time, the planner and 'auto' choose it when a whole copy does not
fit, and a killed worker of a sharded group still surfaces as a clear error.

Process groups are expensive on a 2-core machine: one forked group of four ranks checks the forward
level (with instrumentation inside the ranks), one worker group of two ranks the whole path.
"""
import json
import os
import signal
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from safetensors.torch import save_file

from conftest import free_port, relative_error
from test_distributed import TOLERANCE, _inputs  # the same tiny inputs as the unsharded tests
from test_plan import inventory, write_header_only_checkpoint
from wanvideo.checkpoint import inspect_checkpoint, load_wan_model, read_safetensors_header
from wanvideo.lora import apply_loras
from wanvideo.parallel.distributed import DistributedWanRunner, ParallelDegrees, WorkerGroupError
from wanvideo.parallel.distributed.sharding import (ShardedLoadReport, _TensorSource, check_shard_weights,
                                                    load_sharded_model, resolve_shard_weights, shard_rows,
                                                    whole_copy_bytes)
from wanvideo.parallel.plan import ModelFootprint, latent_token_count, plan_parallelism, usable_memory
from wanvideo.parallel.plan_sharded import estimate_sharded_bytes
from wanvideo.pipeline import LoadSettings, load_prepared_model
from wanvideo.sampling.loop import Conditioning, sample_video
from wanvideo.tiny import make_tiny_checkpoint

CPU = torch.device("cpu")
BF16_TOLERANCE = 3e-2
GIB = 2**30


def _reference_velocity(model, x, t, positive, negative, cfg):
    y = None if positive.y is None else list(positive.y)
    with torch.no_grad():
        cond = torch.stack(model(list(x), t, positive.context, clip_fea=positive.clip_fea, y=y))
        uncond = torch.stack(model(list(x), t, negative.context, clip_fea=positive.clip_fea, y=y))
    return uncond + cfg * (cond - uncond)


def _write_lora(path, state, targets, seed=3):
    """A rank-4 LoRA (ComfyUI keys) on `targets` of a tiny model's state dict."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name in targets:
        out_features, in_features = state[name + ".weight"].shape[:2]
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, in_features, generator=g) * 0.2
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_features, 4, generator=g) * 0.2
        lora[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    save_file(lora, str(path))
    return str(path)


LORA_TARGETS = ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.3.cross_attn.o", "text_embedding.0", "head.head")


# --- in this process -----------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 5, 8, 45, 96])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_rows_are_fsdp_s_torch_chunk_split(length, world_size):
    chunks = torch.arange(length).chunk(world_size)
    for rank in range(world_size):
        start, stop = shard_rows(length, world_size, rank)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, stop)) == expected


def test_auto_shards_only_when_a_whole_copy_does_not_fit(tmp_path):
    info = inspect_checkpoint(make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v")[0])
    whole = whole_copy_bytes(info, "bf16")
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    roomy = {gpus[0]: 40 * GIB, gpus[1]: 40 * GIB}
    assert resolve_shard_weights("auto", info, gpus, "bf16", free_memory=roomy)[0] is False
    tight = {gpus[0]: 40 * GIB, gpus[1]: whole + GIB // 2}   # the weights fit, the runtime reserve does not
    on, reason = resolve_shard_weights("auto", info, gpus, "bf16", free_memory=tight)
    assert on and "cuda:1" in reason and "1/2" in reason
    assert resolve_shard_weights("auto", info, gpus, "bf16", reserve_bytes=50 * GIB, free_memory=roomy)[0]
    assert resolve_shard_weights("auto", info, [CPU, CPU])[0] is False   # no memory figure: whole copies
    assert resolve_shard_weights("on", info, [CPU])[0] and not resolve_shard_weights(False, info, [CPU])[0]
    with pytest.raises(ValueError, match="shard_weights='yes'.*'off', 'on', 'auto'"):
        check_shard_weights("yes")


def test_planner_shards_a_model_that_fits_no_gpu_whole(tmp_path):
    info = inspect_checkpoint(str(write_header_only_checkpoint(tmp_path / "14B.safetensors", dim=5120, ffn_dim=13824,
                                                               num_heads=40, num_layers=40)))
    gpus = inventory(24, 24)
    config = plan_parallelism(info, gpus)   # 28 GB of bf16 weights: 14 GB each, CFG groups of one GPU
    assert config["parallelism_type"] == "distributed" and config["shard_weights"] == "on"
    assert (config["cfg_degree"], config["ulysses_degree"], config["ring_degree"]) == (2, 1, 1)
    assert "1/2 of the weights" in config["reason"] and "FSDP2" in config["reason"]
    assert all(e <= usable_memory(g) for e, g in zip(config["estimated_memory_per_gpu"], gpus))
    assert plan_parallelism(info, gpus, shard_weights="off")["parallelism_type"] == "block_distribution"
    four = plan_parallelism(info, inventory(16, 16, 16, 16))
    assert four["shard_weights"] == "on" and (four["cfg_degree"], four["ulysses_degree"]) == (2, 2)
    assert plan_parallelism(info, inventory(80))["shard_weights"] == "off"          # fits whole: no shards
    assert plan_parallelism(info, inventory(24, 24), block_swap=True)["parallelism_type"] != "distributed"
    assert plan_parallelism(info, inventory(12, 12))["shard_weights"] == "off"   # 14 GB shards do not fit 12 GB
    footprint = ModelFootprint(info)
    one_branch = footprint.activation_bytes(latent_token_count(832, 480, 81), 1)
    assert config["estimated_memory_per_gpu"] == [estimate_sharded_bytes(footprint, one_branch, 2)] * 2


# --- four ranks, forward level (forked here, instrumented inside) ----------------------------------

_COUNT_READ = _TensorSource._count


def _track_reads(reads):
    """Make _TensorSource record each read and how many earlier reads are still alive at that moment."""
    original, alive = _COUNT_READ, []

    def counting(self, tensor):
        live = [ref for ref in alive if ref() is not None]
        reads.append((tensor.nbytes, len(live)))
        alive[:] = live + [weakref.ref(tensor)]
        return original(self, tensor)
    _TensorSource._count = counting


def _four_rank_checks(rank, world_size, port, paths, out_folder):
    """One rank: sharded against unsharded against the plain model, memory and reads recorded."""
    from wanvideo.parallel.distributed.cfg_parallel import GuidedVelocityModel
    from wanvideo.parallel.distributed.sequence_parallel import apply_sequence_parallel
    from wanvideo.parallel.distributed.topology import ParallelGroups
    from torch.distributed.tensor import DTensor
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results = {"errors": {}, "memory": {}}
    t = torch.tensor([600.0])
    layouts = [ParallelDegrees(2, 1, 2), ParallelDegrees(1, 2, 2), ParallelDegrees(2, 2, 1)]
    groups = {d: ParallelGroups(d) for d in layouts}
    # (model, settings, layouts): every layout once in fp32; the 2-rank worker group covers i2v's others
    cases = [("t2v", LoadSettings(base_precision="fp32"), layouts),
             ("i2v", LoadSettings(base_precision="fp32", loras=[(paths["i2v_lora"], 0.8)]), layouts[:1]),
             ("t2v", LoadSettings(base_precision="fp32", quantization="fp8_e4m3fn", loras=[(paths["t2v_lora"], 0.5)]),
              layouts[2:]),
             ("t2v", LoadSettings(base_precision="bf16", quantization="fp8_e4m3fn"), layouts[2:]),
             ("t2v", LoadSettings(base_precision="bf16"), layouts[2:])]
    for index, (model_type, settings, case_layouts) in enumerate(cases):
        name = f"{model_type} {settings.base_precision} {settings.quantization} lora={bool(settings.loras)}"
        reads = []
        _track_reads(reads)
        sharded, _, report = load_sharded_model(paths[model_type], CPU, settings)
        plain = load_prepared_model(paths[model_type], CPU, settings)[0]
        x, positive, negative = _inputs(model_type, seed=index)
        expected = _reference_velocity(plain, x, t, positive, negative, 4.0)
        storage = sum(p.to_local().untyped_storage().nbytes() for p in sharded.parameters())
        header, _ = read_safetensors_header(paths[model_type])
        results["memory"][name] = dict(local=report.local_bytes, model=report.model_bytes, storage=storage,
                                       read=report.read_bytes, largest_read=report.largest_read_bytes,
                                       most_alive_before_a_read=max(alive for _, alive in reads),
                                       largest_in_file=max(e["data_offsets"][1] - e["data_offsets"][0]
                                                           for e in header.values()))
        errors = results["errors"].setdefault(name, {})
        for degrees in case_layouts:
            outs = []
            for model in (sharded, plain):
                apply_sequence_parallel(model, groups[degrees])
                guided = GuidedVelocityModel(model, groups[degrees], negative, 4.0)
                y = None if positive.y is None else list(positive.y)
                with torch.no_grad():
                    outs.append(torch.stack(guided(list(x), t, positive.context, clip_fea=positive.clip_fea, y=y)))
            errors[str(degrees)] = dict(sharded_vs_single=relative_error(outs[0], expected),
                                        unsharded_vs_single=relative_error(outs[1], expected),
                                        sharded_vs_unsharded=relative_error(outs[0], outs[1]))
        # after the forwards every weight is back to this rank's shard (embeddings and head too)
        results["memory"][name]["resharded"] = all(isinstance(p, DTensor) for p in sharded.parameters())
        del sharded, plain
    with open(os.path.join(out_folder, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharding")
    paths = {}
    for model_type, seed in (("t2v", 0), ("i2v", 1)):
        path, _, state = make_tiny_checkpoint(folder / f"{model_type}.safetensors", model_type, seed=seed, dim=96,
                                              num_heads=6)
        paths[model_type] = str(path)
        targets = LORA_TARGETS + (("img_emb.proj.1", "blocks.2.cross_attn.k_img") if model_type == "i2v" else ())
        paths[f"{model_type}_lora"] = _write_lora(folder / f"{model_type}_lora.safetensors", state, targets)
    return paths


@pytest.fixture(scope="module")
def four_rank_results(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    # fork: the ranks inherit this process's imports (spawning four fresh interpreters costs more than the checks)
    torch_mp.start_processes(_four_rank_checks, args=(4, free_port(), tiny_files, str(out)), nprocs=4,
                             start_method="fork")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]


def test_sharded_equals_unsharded_and_the_single_process(four_rank_results):
    """fp32: t2v under cfg 2 x ring 2, ulysses 2 x ring 2, cfg 2 x ulysses 2; i2v with a LoRA under
    cfg 2 x ring 2; fp8 storage (with a LoRA merged and re-quantized) and bf16 under cfg 2 x ulysses 2.
    In bf16 sequence-parallel attention rounds differently from the plain model; the shards change nothing."""
    for results in four_rank_results:
        assert len(results["errors"]) == 5
        for case, by_layout in results["errors"].items():
            for layout, errors in by_layout.items():
                assert errors["sharded_vs_unsharded"] <= TOLERANCE, (case, layout, errors)
                limit = BF16_TOLERANCE if case.startswith("t2v bf16") else TOLERANCE
                assert max(errors.values()) <= limit, (case, layout, errors)


def test_each_rank_holds_a_quarter_and_reads_one_tensor_at_a_time(four_rank_results):
    for case in four_rank_results[0]["memory"]:
        memory = [r["memory"][case] for r in four_rank_results]
        model_bytes = memory[0]["model"]
        assert sum(m["local"] for m in memory) == model_bytes, case   # the shards add up to the model
        for m in memory:
            assert abs(m["local"] - model_bytes / 4) <= 0.05 * model_bytes / 4, (case, m)
            assert m["storage"] <= 1.05 * model_bytes / 4, (case, m)    # FSDP's padded shard storage: ~1/4 too
            # the load held at most one tensor of the file at a time, never the whole model
            assert m["most_alive_before_a_read"] == 0, (case, m)
            assert m["resharded"], (case, m)
            assert m["largest_read"] <= m["largest_in_file"], (case, m)
    plain = [r["memory"]["t2v fp32 disabled lora=False"] for r in four_rank_results]
    assert all(m["read"] == m["local"] for m in plain)   # nothing to compute on whole tensors: only its rows


# --- two ranks, the whole path: worker group, sampling, LoRA, a killed worker ------------------------

@pytest.fixture(scope="module")
def i2v_sharded_pair(tiny_files):
    runner = DistributedWanRunner(tiny_files["i2v"], [CPU] * 2, base_precision="fp32", shard_weights="on",
                                  loras=[(tiny_files["i2v_lora"], 0.8)])
    reference = load_wan_model(tiny_files["i2v"], CPU, "fp32")
    apply_loras(reference, [(tiny_files["i2v_lora"], 0.8)])
    yield runner, reference
    runner.shutdown()


@pytest.mark.parametrize("degrees", [ParallelDegrees(2, 1, 1), ParallelDegrees(1, 2, 1), ParallelDegrees(1, 1, 2)],
                         ids=str)
def test_two_sharded_workers_equal_the_single_process(i2v_sharded_pair, degrees):
    runner, reference = i2v_sharded_pair
    assert runner.shard_weights and runner.shard_reason == "shard_weights='on'"
    x, positive, negative = _inputs("i2v", seed=5)
    t = torch.tensor([450.0])
    out = runner.forward(x, t, positive, negative, cfg=3.5, degrees=degrees)
    assert relative_error(out, _reference_velocity(reference, x, t, positive, negative, 3.5)) <= TOLERANCE


def test_sharded_sampling_equals_the_single_process_and_a_killed_worker_is_named(i2v_sharded_pair):
    runner, reference = i2v_sharded_pair
    x, positive, negative = _inputs("i2v", seed=6)
    with torch.no_grad():
        expected = sample_video(reference, x, positive, negative, steps=2, cfg=4.0, shift=5.0, progress=False)
    out = runner.sample(x, positive, negative, steps=2, cfg=4.0, shift=5.0)
    assert relative_error(out, expected) <= TOLERANCE

    pids = [p.pid for p in runner._group.processes]

    def kill_rank_one(step, total, x0):
        if step == 0:
            os.kill(pids[1], signal.SIGKILL)

    with pytest.raises(WorkerGroupError, match=r"rank 1 \(pid \d+\) was killed by signal 9"):
        runner.sample(x, positive, negative, steps=500, cfg=4.0, callback=kill_rank_one)
    assert not runner.started and not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_report_summary_names_the_share():
    report = ShardedLoadReport(rank=1, world_size=4, local_bytes=2**20, model_bytes=2**22, largest_read_bytes=2**18,
                               read_bytes=2**20)
    assert "rank 1 of 4 holds 1.0 MiB of 4.0 MiB" in report.summary()


def test_shard_weights_reaches_the_workers_from_the_api_and_the_node(tiny_files, monkeypatch):
    """api.load -> load_parallel_pipeline -> load_distributed_pipeline, with an activation reserve per
    GPU for 'auto'; the Multi-GPU loader offers the input; a bad value is refused before any worker."""
    import wanvideo.parallel.distributed.pipeline as distributed_pipeline
    from test_nodes import PACKAGE
    from wanvideo import api
    calls = []
    monkeypatch.setattr(distributed_pipeline, "load_distributed_pipeline",
                        lambda path, devices, settings, **kwargs: calls.append(kwargs) or "pipeline")
    assert api.load(tiny_files["t2v"], "distributed", devices=[CPU, CPU], shard_weights="on") == "pipeline"
    assert calls[-1]["shard_weights"] == "on" and calls[-1]["reserve_bytes"] > 0
    api.load(tiny_files["t2v"], "distributed", devices=[CPU, CPU])
    assert calls[-1]["shard_weights"] == "auto"
    with pytest.raises(ValueError, match="shard_weights='sometimes'"):
        api.load(tiny_files["t2v"], "distributed", devices=[CPU, CPU], shard_weights="sometimes")
    spec = PACKAGE.NODE_CLASS_MAPPINGS["WanVideoMultiGPULoader"].INPUT_TYPES()["required"]["shard_weights"]
    assert spec[0] == ["off", "on", "auto"] and spec[1]["default"] == "auto" and "1/N" in spec[1]["tooltip"]
