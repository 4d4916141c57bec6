"""GPU benchmark of the Wan model: one block and one whole forward, against diffusers.

Real-size configs with random bf16 weights (initialised on the GPU), 512 text tokens, SDPA: Wan 2.1
1.3B and 14B at 81 frames, 480p (32,760 tokens) and 720p (75,600 tokens); Wan 2.2 TI2V-5B at its
720p (1280x704, 121 frames: 31 latent frames of 44x80 in the Wan 2.2 VAE, 27,280 tokens), once with
one timestep (t2v) and once with per-token timesteps (`5B_720p-i2v`: the first latent frame's tokens
at t = 0, as image-to-video runs). Prints a table and writes
JSON to $OUT (or ./benchmarks/out) as model.json. Run it in the same call as
../shared/reference/wan_block_reference.py (copied into a carried folder) so both come from one card.

    python benchmarks/bench_model.py [--cases 1.3B_480p,14B_480p,14B_720p] [--no-diffusers]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: `python benchmarks/bench_model.py` finds wanvideo
from wanvideo.modules import model as model_module  # noqa: E402
from wanvideo.modules.attention import cuda_event_time_ms  # noqa: E402
from wanvideo.modules.model import WanModel  # noqa: E402

SIZES = {"1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
         "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
         "5B": dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, model_type="ti2v", in_dim=48, out_dim=48)}
RESOLUTIONS = {"480p": (60, 104), "720p": (90, 160)}  # latent height, width (pixels / 8)
LATENT_FRAMES = 21  # 81 video frames
WAN22_VAE_LATENTS = {"720p": (31, 44, 80)}  # TI2V-5B: 121 frames at 1280x704, 4x temporal and 16x spatial


FUSED = (model_module.fused_norm_and_rope, model_module.fused_modulate, model_module.fused_gated_residual)


def event_time_ms(fn, iters=5, warmup=2):
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def back_to_back_ms(fn, iters=5, warmup=2):
    """Milliseconds per fn() over iters calls queued back to back between two CUDA events (the timer of
    attention_mode 'auto'): the GPU's time with the host ahead of it, as inside a model (event_time_ms's
    single calls also count the host's launch time before the first kernel, when the GPU waits for it).
    warmup calls first, the last of them by the timer itself."""
    for _ in range(warmup - 1):
        fn()
    torch.cuda.synchronize()
    return cuda_event_time_ms(None, fn, torch.cuda.current_device(), calls=iters)


def gpu_time_ms(fn, calls=5):
    """(milliseconds, {kernel name: milliseconds}) of the GPU's own work per fn() call, by the profiler:
    every kernel's (and copy's) duration summed, so neither the host's launch time nor idle gaps
    count, the figure that compares kernels. One untimed call first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1e3 / calls
    return sum(kernels.values()), kernels


def random_init_(module, std=0.02):
    """Random (never zero) weights, drawn on the module's device."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0).add_(torch.randn_like(p), alpha=0.1)
            else:
                p.normal_(0, std)
    return module


def build_ours(size, device="cuda", dtype=torch.bfloat16, layers=None):
    config = dict(dict(model_type="t2v", in_dim=16), **SIZES[size])
    if layers is not None:
        config["num_layers"] = layers
    with torch.device("meta"):
        model = WanModel(**config)
    model = model.to_empty(device=device).to(dtype)
    return random_init_(model).eval().requires_grad_(False)


def fp8_linears_(root):
    """Every nn.Linear under `root` as an FP8Linear (e4m3, per-tensor scale, quantized from its current
    weight), in place, as quantization 'fp8_e4m3fn' stores them. -> root."""
    import torch.nn as nn
    from wanvideo.quantization import FP8Linear, quantize_weight
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, FP8Linear):
            parent_name, _, child = name.rpartition(".")
            new = FP8Linear(module.in_features, module.out_features, module.bias is not None,
                            device=module.weight.device)
            weight, scale = quantize_weight(module.weight.data, torch.float8_e4m3fn)
            new.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
            new.scale_weight.copy_(scale)
            setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    return root


def build_diffusers(size, device="cuda", dtype=torch.bfloat16):
    from diffusers import WanTransformer3DModel
    s = SIZES[size]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(num_attention_heads=s["num_heads"], attention_head_dim=128,
                                          in_channels=s.get("in_dim", 16), out_channels=s.get("out_dim", 16),
                                          ffn_dim=s["ffn_dim"], num_layers=s["num_layers"])
    finally:
        torch.set_default_dtype(previous)
    return random_init_(model).eval().requires_grad_(False)


def forward_flops(config, tokens, text_tokens=512):
    """Matmul and attention FLOPs of one forward of `config` over `tokens` video tokens."""
    dim, ffn, layers = config["dim"], config["ffn_dim"], config["num_layers"]
    per_block = (2 * tokens * (4 * dim * dim + 2 * dim * ffn + 2 * dim * dim)  # self q,k,v,o; ffn; cross q,o
                 + 2 * text_tokens * 2 * dim * dim                             # cross k,v
                 + 4 * tokens * tokens * dim + 4 * tokens * text_tokens * dim)  # attention
    return layers * per_block


def bench_case(size, resolution, use_diffusers, results, blocks_only=False, per_token_t=False):
    frames, h, w = WAN22_VAE_LATENTS[resolution] if size == "5B" else (LATENT_FRAMES, *RESOLUTIONS[resolution])
    tokens = frames * (h // 2) * (w // 2)
    name = f"{size}_{resolution}" + ("-i2v" if per_token_t else "")
    row = {"case": name, "tokens": tokens}
    torch.manual_seed(0)
    config = dict(SIZES[size])
    x = [torch.randn(config.get("in_dim", 16), frames, h, w, device="cuda")]
    t = torch.tensor([500.0], device="cuda")
    if per_token_t:  # [B, seq_len]: the clean first latent frame's tokens at t = 0
        t = torch.full((1, tokens), 500.0, device="cuda")
        t[:, :tokens // frames] = 0
    context = [torch.randn(512, 4096, device="cuda")]

    model = build_ours(size)
    with torch.inference_mode():
        tok, ctx, e, grid = model.embed(x, t, context)
        block = model.blocks[0]
        torch.cuda.reset_peak_memory_stats()
        row["block_ms"] = event_time_ms(lambda: block(tok, ctx), iters=7, warmup=2)
        block_flops = forward_flops(dict(config, num_layers=1), tokens)
        row["block_tflops"] = block_flops / row["block_ms"] / 1e9
        row["fused_kernels"] = not model_module.fused_norm_and_rope.failed
        fused_out = block(tok, ctx)
        for fused in FUSED:
            fused.failed = True
        row["block_eager_ms"] = event_time_ms(lambda: block(tok, ctx), iters=5, warmup=1)
        eager_out = block(tok, ctx)
        row["fused_vs_eager_rel_err"] = ((fused_out.float() - eager_out.float()).norm() / eager_out.float().norm()).item()
        for fused in FUSED:
            fused.failed = not row["fused_kernels"]
        del fused_out, eager_out
        if blocks_only:
            results.append(row)
            print(json.dumps(row), flush=True)
            return
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        row["forward_s"] = event_time_ms(lambda: model(x, t, context), iters=3, warmup=1) / 1000
        row["forward_tflops"] = forward_flops(config, tokens) / row["forward_s"] / 1e12
        row["forward_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        del tok, ctx, e
    del model
    torch.cuda.empty_cache()

    if use_diffusers:
        model = build_diffusers(size)
        hidden = x[0][None].to(torch.bfloat16)
        text = context[0][None].to(torch.bfloat16)
        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats()
            row["diffusers_forward_s"] = event_time_ms(
                lambda: model(hidden, t, text, return_dict=False), iters=3, warmup=1) / 1000
            row["diffusers_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        row["speedup_vs_diffusers"] = row["diffusers_forward_s"] / row["forward_s"]
        del model
        torch.cuda.empty_cache()
    results.append(row)
    print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1.3B_480p,14B_480p,14B_720p",
                        help="size_resolution[-i2v], comma-separated (e.g. 5B_720p,5B_720p-i2v)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' model")
    parser.add_argument("--blocks-only", action="store_true", help="time one block only (fused and eager)")
    args = parser.parse_args()
    results = []
    start = time.time()
    for case in args.cases.split(","):
        size, resolution = case.removesuffix("-i2v").split("_")
        bench_case(size, resolution, not args.no_diffusers, results, args.blocks_only, case.endswith("-i2v"))
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "seconds": time.time() - start}
    json.dump({"info": info, "results": results}, open(os.path.join(out, "model.json"), "w"), indent=1)
    print(f"\n{info['device']}  torch {info['torch']}")
    print(f"{'case':<10} {'block ms':>9} {'eager ms':>9} {'TFLOP/s':>8} {'fwd s':>7} {'peak GiB':>9} "
          f"{'diffusers s':>12} {'speed-up':>9}")
    nan = float("nan")
    for r in results:
        print(f"{r['case']:<10} {r['block_ms']:>9.2f} {r['block_eager_ms']:>9.2f} {r['block_tflops']:>8.0f} "
              f"{r.get('forward_s', nan):>7.3f} {r.get('forward_peak_GiB', nan):>9.1f} "
              f"{r.get('diffusers_forward_s', nan):>12.3f} {r.get('speedup_vs_diffusers', nan):>9.2f}")


if __name__ == "__main__":
    main()
