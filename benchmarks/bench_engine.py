"""GPU benchmark of the single-GPU engine and the in-process strategies, in one run.

  swap     14B bf16 480p/81f forward: resident vs 30 of 40 blocks swapped (prefetch 1 and 2);
           1.3B 480p: resident vs all 30 blocks swapped. Seconds and peak GPU memory.
  swap_short  14B at 480p/17 frames, 30 swapped, prefetch 1, 2, 4 (not in the default parts).
  fp8      one 14B block at 480p: bf16 vs fp8 storage (upcast) vs fp8 fast (_scaled_mm), with the
           relative L2 error of the output against bf16.
  compile  one 14B block at 480p: eager vs compile_blocks.
  paths    1.3B at 480p from a random real-size checkpoint: the plain model vs data_parallel and
           block_distribution (pipelined and not, with swap) on [cuda:0, cuda:0]; CFG step time and
           the output's relative error against the plain model (bf16).

    python benchmarks/bench_engine.py [--parts swap,fp8,compile,paths]
Writes engine.json to $OUT (or benchmarks/out).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import LATENT_FRAMES, RESOLUTIONS, build_ours, event_time_ms, fp8_linears_  # noqa: E402

RESULTS = {}


def record(name, **values):
    RESULTS[name] = values
    print(json.dumps({name: values}), flush=True)


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def inputs(resolution="480p", batch=1, latent_frames=LATENT_FRAMES):
    h, w = RESOLUTIONS[resolution]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(16, latent_frames, h, w, device="cuda", generator=g) for _ in range(batch)]
    t = torch.full((batch,), 500.0, device="cuda")
    context = [torch.randn(512, 4096, device="cuda", generator=g) for _ in range(batch)]
    return x, t, context


def bench_swap(cases=(("14B", 30, 21, (1, 2)), ("1.3B", 30, 21, (1, 2)))):
    """cases: (size, blocks swapped, latent frames, prefetch settings)."""
    from wanvideo.engine import BlockSwapSettings, enable_block_swap
    for size, blocks, latent_frames, prefetches in cases:
        x, t, context = inputs(latent_frames=latent_frames)
        model = build_ours(size)
        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats()
            resident_s = event_time_ms(lambda: model(x, t, context), iters=3, warmup=1) / 1000
            resident_peak = torch.cuda.max_memory_allocated() / 2**30
            reference = model(x, t, context)[0]
        model = model.to("cpu")
        torch.cuda.empty_cache()
        for blocks in (blocks,):
            for prefetch in prefetches:
                swapper = enable_block_swap(model, "cuda", BlockSwapSettings(blocks_to_swap=blocks,
                                                                             prefetch_blocks=prefetch))
                with torch.inference_mode():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    swapped_s = event_time_ms(lambda: model(x, t, context), iters=3, warmup=1) / 1000
                    swapped_peak = torch.cuda.max_memory_allocated() / 2**30
                    error = rel_err(model(x, t, context)[0], reference)
                record(f"swap_{size}_{blocks}of{len(model.blocks)}_{latent_frames * 4 - 3}frames_prefetch{prefetch}",
                       resident_s=resident_s,
                       swapped_s=swapped_s, ratio=swapped_s / resident_s, resident_peak_GiB=resident_peak,
                       swapped_peak_GiB=swapped_peak, pinned_GiB=swapper.pinned_bytes() / 2**30,
                       rel_err_vs_resident=error)
                swapper.remove(restore_device="cpu")
                torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def _fp8_block(block, mode):
    """A copy of `block` whose Linears are FP8Linear (storage), with the fast path on or off."""
    import copy
    import torch.nn as nn
    from wanvideo.engine import set_fp8_fast
    block = fp8_linears_(copy.deepcopy(block))
    holder = nn.Module()
    holder.blocks = nn.ModuleList([block])
    active = set_fp8_fast(holder, mode == "fast")
    return block, active


def bench_fp8_and_compile(parts):
    model = build_ours("14B", layers=1)
    x, t, context = inputs()
    with torch.inference_mode():
        tokens, ctx, _, _ = model.embed(x, t, context)
        block = model.blocks[0]
        bf16_ms = event_time_ms(lambda: block(tokens, ctx), iters=7, warmup=2)
        reference = block(tokens, ctx)
        if "fp8" in parts:
            row = {"bf16_ms": bf16_ms}
            for mode in ("storage", "fast"):
                fp8_block, active = _fp8_block(block, mode)
                row[f"{mode}_active"] = active
                row[f"{mode}_ms"] = event_time_ms(lambda: fp8_block(tokens, ctx), iters=7, warmup=2)
                row[f"{mode}_speedup"] = bf16_ms / row[f"{mode}_ms"]
                row[f"{mode}_rel_err"] = rel_err(fp8_block(tokens, ctx), reference)
                del fp8_block
            record("fp8_14B_block_480p", **row)
        if "compile" in parts:
            from wanvideo.engine import compile_blocks
            started = time.perf_counter()
            compile_blocks(model)
            block(tokens, ctx)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            compiled_ms = event_time_ms(lambda: block(tokens, ctx), iters=7, warmup=2)
            record("compile_14B_block_480p", eager_ms=bf16_ms, compiled_ms=compiled_ms,
                   speedup=bf16_ms / compiled_ms, first_call_s=compile_s,
                   rel_err=rel_err(block(tokens, ctx), reference))
    del model
    torch.cuda.empty_cache()


def write_random_checkpoint(path, size):
    from safetensors.torch import save_file
    model = build_ours(size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    del model
    torch.cuda.empty_cache()


def bench_paths():
    from wanvideo.parallel import load_parallel_pipeline
    from wanvideo.pipeline import LoadSettings, load_pipeline
    from wanvideo.engine import BlockSwapSettings
    from wanvideo.sampling import Conditioning, make_noise
    path = "/tmp/wan_1.3B_random.safetensors"
    write_random_checkpoint(path, "1.3B")
    h, w = RESOLUTIONS["480p"]
    noise = make_noise((1, 16, LATENT_FRAMES, h, w), seed=1)
    g = torch.Generator().manual_seed(2)
    pos, neg = Conditioning([torch.randn(40, 4096, generator=g)]), Conditioning([torch.randn(20, 4096, generator=g)])
    steps = 3
    settings = LoadSettings(base_precision="bf16")
    two = [torch.device("cuda", 0)] * 2
    variants = [
        ("plain", lambda: load_pipeline(path, "cuda:0", settings)),
        ("plain_swap_all", lambda: load_pipeline(path, "cuda:0", LoadSettings(
            base_precision="bf16", block_swap=BlockSwapSettings(blocks_to_swap=30)))),
        ("data_parallel_x2", lambda: load_parallel_pipeline(path, "data_parallel", settings=settings, devices=two)),
        ("block_distribution_x2_pipelined", lambda: load_parallel_pipeline(path, "block_distribution",
                                                                           settings=settings, devices=two)),
        ("block_distribution_x2_in_turn", lambda: load_parallel_pipeline(path, "block_distribution", settings=settings,
                                                                         devices=two, pipeline_branches=False)),
        ("block_distribution_x2_swap", lambda: load_parallel_pipeline(
            path, "block_distribution", settings=settings, devices=two, blocks_per_gpu=[15, 15],
            blocks_to_swap_per_gpu=[5, 5])),
    ]
    reference = None
    for name, build in variants:
        started = time.perf_counter()
        pipeline = build()
        load_s = time.perf_counter() - started
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run = lambda: pipeline.generate(noise, pos, neg, steps=steps, cfg=5.0, shift=3.0, progress=False)
        run()  # warm-up (compiles the fused kernels for this shape)
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - started) / steps
        reference = out if reference is None else reference
        record(f"path_1.3B_480p_{name}", load_s=load_s, step_s=step_s, peak_GiB=torch.cuda.max_memory_allocated() / 2**30,
               rel_err_vs_plain=rel_err(out, reference), placement=pipeline.describe().splitlines()[2:])
        pipeline.unload()
        del pipeline
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="swap,fp8,compile,paths")
    parts = parser.parse_args().parts.split(",")
    started = time.time()
    short_clips = lambda: bench_swap((("14B", 30, 5, (1, 2, 4)),))  # 17 frames: blocks compute faster than they upload
    for part, fn in (("swap", bench_swap), ("swap_short", short_clips), ("paths", bench_paths)):
        if part in parts:
            try:
                fn()
            except Exception as error:  # report and go on: one call must bring back every other figure
                import traceback
                traceback.print_exc()
                record(f"{part}_failed", error=repr(error))
    if "fp8" in parts or "compile" in parts:
        try:
            bench_fp8_and_compile(parts)
        except Exception as error:
            import traceback
            traceback.print_exc()
            record("fp8_compile_failed", error=repr(error))
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "seconds": time.time() - started}
    json.dump({"info": info, "results": RESULTS}, open(os.path.join(out, "engine.json"), "w"), indent=1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
