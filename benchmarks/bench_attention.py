"""GPU benchmark of attention_mode 'sage_triton' (issue 15) against torch SDPA, on one GPU.

Attention at Wan shapes, bf16, batch 1, head dim 128: self-attention with 12 and 40 heads (Wan 2.1
1.3B and 14B) over 32,760 (480p, 81 frames) and 75,600 tokens (720p); cross-attention from those
tokens to 512 text tokens (and 257 CLIP image tokens, i2v), once with a ragged text mask. For each:
  - times (CUDA events, median, same process): the package's SDPA call (the model's path), SDPA
    restricted to cuDNN and to flash (where they run), sage_triton, and sage_triton's quantization
    alone; its first call (compile + autotune) separately, with every tuned config's time; for
    self-attention also sage_triton with fp16 P/V (INT8 Q/K only; always the Triton kernel, so compare
    it with the next column to see what FP8 P/V buys), and where sage_triton ran its warp-specialized
    Hopper kernel (sage_hopper) the Triton kernel on the same call; SDPA and sage_triton once more
    with their calls queued back to back (bench_model.back_to_back_ms: the host's launch time, which
    single timed calls include, hidden as inside a model; "x b2b" in the table), and the GPU's own time
    per call by the profiler (bench_model.gpu_time_ms: kernels only, SDPA and sage_triton in turns,
    medians of three rounds; "x GPU", and "x kern": SDPA against the 8-bit attention kernel alone,
    without the quantization);
  - accuracy: relative L2 error of sage_triton against bf16 SDPA over the whole output, and of both
    against exact fp32 attention on the first 512 queries.
Then one real-size Wan 2.1 14B block (random weights, benchmarks/bench_model.py's build_ours) at 480p
(and 720p with --block-resolutions 480p,720p): block time with sdpa and with sage_triton, and the
relative error of the block's output, and with attention_mode 'auto' (what it chose per shape);
with --compile also under per-block torch.compile, with sdpa and with auto.
With --step, the whole 14B model: a sampling step at cfg 5 (e.g. 720p) with sdpa, sage_triton and
auto, with ',sample' a 3-step 480p sample's error, with ',fp8' auto with fp8 weights (bench_step). Prints a table and writes
attention.json to $OUT (or benchmarks/out). About two minutes on an H200; five with --step 720p,sample.

    python benchmarks/bench_attention.py [--cases all|none|name,...] [--block-resolutions 480p] [--no-block]
                                         [--compile] [--step 720p[,sample][,fp8]]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                                  # wanvideo
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))      # bench_model

HEAD_DIM = 128
# name -> (heads, query tokens, key tokens, real keys: None = all)
CASES = {
    "self_12h_32760": (12, 32760, 32760, None),
    "self_40h_32760": (40, 32760, 32760, None),
    "self_12h_75600": (12, 75600, 75600, None),
    "self_40h_75600": (40, 75600, 75600, None),
    "cross_12h_32760x512": (12, 32760, 512, None),
    "cross_40h_32760x512": (40, 32760, 512, None),
    "cross_40h_75600x512": (40, 75600, 512, None),
    "cross_40h_75600x257": (40, 75600, 257, None),
    "cross_40h_75600x512_mask300": (40, 75600, 512, 300),
}
GPU_TIME_ROUNDS = 3  # alternating rounds of the GPU-time measurement (medians)
# sage_triton's attention kernels (not its quantization's), as the profiler names them
ATTENTION_KERNELS = ("_sage_attention_kernel", "_sage_hopper_kernel", "_combine_tail_kernel")
EXACT_QUERIES = 512  # rows of the exact fp32 reference (its score matrix is H x 512 x Lk floats)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="all", help=f"'all' or a comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--block-resolutions", default="480p", help="14B block resolutions: 480p, 720p (comma-separated)")
    parser.add_argument("--no-block", action="store_true", help="skip the 14B block")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per measurement (median); 2 warm-up calls")
    parser.add_argument("--compile", action="store_true",
                        help="also time the 14B block under per-block torch.compile, with sdpa and with auto")
    parser.add_argument("--step", default="",
                        help="whole 14B model: 'RES' times one sampling step (cfg 5) at RES with sdpa, sage_triton "
                             "and auto; add ',sample' for a 3-step 480p sample's error (e.g. 720p,sample), ',fp8' "
                             "for sdpa and auto, then auto with fp8 weights and matmuls (fp8_e4m3fn_fast)")
    args = parser.parse_args()
    cases = list(CASES) if args.cases == "all" else [c for c in args.cases.split(",") if c and c != "none"]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}")
    args.cases = cases
    return args


def make_inputs(heads, lq, lk, real_keys, seed=0):
    """bf16 q [1, Lq, H, D], k, v [1, Lk, H, D] on the GPU, and the key mask (or None). Keys carry a
    shared per-channel offset, as Wan's do (what the smoothing is for)."""
    import torch
    g = torch.Generator("cuda").manual_seed(seed)
    shape_q, shape_k = (1, lq, heads, HEAD_DIM), (1, lk, heads, HEAD_DIM)
    q = torch.randn(shape_q, device="cuda", generator=g, dtype=torch.bfloat16)
    offset = 2.0 * torch.randn(heads, HEAD_DIM, device="cuda", generator=g)
    k = (torch.randn(shape_k, device="cuda", generator=g) + offset).to(torch.bfloat16)
    v = torch.randn(shape_k, device="cuda", generator=g, dtype=torch.bfloat16)
    mask = None
    if real_keys is not None:
        mask = torch.zeros(1, lk, dtype=torch.bool, device="cuda")
        mask[:, :real_keys] = True
    return q, k, v, mask


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exact_rows(q, k, v, mask, rows):
    """Exact fp32 attention of the first `rows` queries: [1, rows, H, D]."""
    import torch
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q[:, :rows], k, v))      # [1, H, L, D]
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2)


def error_text(error, limit):
    """'Type: message' on one line, at most `limit` characters of the message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


def sdpa_with(backend_name):
    """SDPA restricted to one backend (cuDNN or flash), [B, L, H, D] in and out, or None if unknown."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return None

    def run(q, k, v, mask):
        with sdpa_kernel([backend]):
            m = None if mask is None else mask[:, None, None, :]
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=m).transpose(1, 2)
    return run


def bench_case(name, iters, event_time_ms):
    import torch
    from wanvideo.modules import sage_triton
    from wanvideo.modules.attention import attention
    from bench_model import back_to_back_ms, gpu_time_ms
    heads, lq, lk, real_keys = CASES[name]
    q, k, v, mask = make_inputs(heads, lq, lk, real_keys)
    flops = 4.0 * heads * lq * (real_keys or lk) * HEAD_DIM
    row = {"case": name, "heads": heads, "q_tokens": lq, "k_tokens": lk, "real_keys": real_keys or lk}

    with torch.inference_mode():
        ref = attention(q, k, v, key_mask=mask, backend="sdpa")
        row["sdpa_ms"] = event_time_ms(lambda: attention(q, k, v, key_mask=mask, backend="sdpa"), iters=iters)
        for label, backend in (("sdpa_cudnn_ms", "CUDNN_ATTENTION"), ("sdpa_flash_ms", "FLASH_ATTENTION")):
            run = sdpa_with(backend)
            try:
                row[label] = event_time_ms(lambda: run(q, k, v, mask), iters=iters) if run else None
            except RuntimeError as error:  # not available for this shape, mask or build
                row[label] = None
                row[label.replace("_ms", "_error")] = " ".join(str(error).split())[:200]

        kernel = sage_triton._sage_attention_kernel
        tuned_before = getattr(kernel, "configs_timings", None)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = attention(q, k, v, key_mask=mask, backend="sage_triton")   # compiles and tunes on first use
        torch.cuda.synchronize()
        row["sage_first_call_s"] = time.perf_counter() - start
        timings = getattr(kernel, "configs_timings", None)
        if timings is not None and timings is not tuned_before:  # this call tuned: every config's ms
            row["tuning_ms"] = {str(config): [round(t, 4) for t in ms] for config, ms in timings.items()}
        row["sage_ms"] = event_time_ms(lambda: attention(q, k, v, key_mask=mask, backend="sage_triton"), iters=iters)
        row["sage_quantize_ms"] = event_time_ms(lambda: sage_triton.quantize(q, k, v, key_mask=mask), iters=iters)
        # the same two, calls queued back to back (the host's launch time hidden, as inside a model)
        row["sdpa_back_to_back_ms"] = back_to_back_ms(lambda: attention(q, k, v, key_mask=mask, backend="sdpa"), iters)
        row["sage_back_to_back_ms"] = back_to_back_ms(
            lambda: attention(q, k, v, key_mask=mask, backend="sage_triton"), iters)
        # the GPU's own time, SDPA and sage_triton in turns (the clock drifts by a few percent within a call)
        sdpa_rounds, sage_rounds, kernel_rounds = [], [], []
        for _ in range(GPU_TIME_ROUNDS):
            sdpa_rounds.append(gpu_time_ms(lambda: attention(q, k, v, key_mask=mask, backend="sdpa"), iters)[0])
            total, kernels = gpu_time_ms(lambda: attention(q, k, v, key_mask=mask, backend="sage_triton"), iters)
            sage_rounds.append(total)
            kernel_rounds.append(sum(ms for kernel_name, ms in kernels.items() if kernel_name in ATTENTION_KERNELS))
        row.update(sdpa_gpu_rounds_ms=sdpa_rounds, sage_gpu_rounds_ms=sage_rounds,
                   sage_gpu_attention_kernel_rounds_ms=kernel_rounds,
                   sdpa_gpu_ms=statistics.median(sdpa_rounds), sage_gpu_ms=statistics.median(sage_rounds),
                   sage_gpu_kernels_ms={kernel_name: round(ms, 4) for kernel_name, ms in kernels.items()})
        row["sage_rel_err_vs_sdpa"] = rel_err(out, ref)
        row["sage_kernel"] = "hopper" if sage_triton.hopper_kernel_for(
            q, lk, mask, sage_triton.fp8_supported(q.device)) else "triton"
        if row["sage_kernel"] == "hopper":  # the Triton kernel on the same call, for comparison
            triton_out = sage_triton.sage_attention(q, k, v, key_mask=mask, kernel="triton")
            row["sage_triton_kernel_ms"] = event_time_ms(
                lambda: sage_triton.sage_attention(q, k, v, key_mask=mask, kernel="triton"), iters=iters)
            row["sage_triton_kernel_rel_err_vs_sdpa"] = rel_err(triton_out, ref)
            row["hopper_vs_triton_kernel_rel_diff"] = rel_err(out, triton_out)
            del triton_out
        if name.startswith("self_"):
            # the other P/V precision (fp16: INT8 Q/K only), to see what FP8 P/V buys on this GPU
            fp16_pv = sage_triton.sage_attention(q, k, v, key_mask=mask, pv_fp8=False)
            row["sage_fp16pv_ms"] = event_time_ms(
                lambda: sage_triton.sage_attention(q, k, v, key_mask=mask, pv_fp8=False), iters=iters)
            row["sage_fp16pv_rel_err_vs_sdpa"] = rel_err(fp16_pv, ref)
            del fp16_pv

        rows = min(EXACT_QUERIES, lq)
        exact = exact_rows(q, k, v, mask, rows)
        row["sdpa_rel_err_vs_exact"] = rel_err(ref[:, :rows], exact)
        row["sage_rel_err_vs_exact"] = rel_err(out[:, :rows], exact)
        _, lse = sage_triton.sage_attention(q[:, :rows], k, v, key_mask=mask, return_lse=True)
        scores = (q[:, :rows].float().transpose(1, 2) @ k.float().transpose(1, 2).transpose(-1, -2)) / math.sqrt(HEAD_DIM)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        row["sage_lse_max_abs_err"] = (lse - torch.logsumexp(scores, dim=-1)).abs().max().item()
        del exact, scores, out, ref

    best = min(t for t in (row["sdpa_ms"], row.get("sdpa_cudnn_ms"), row.get("sdpa_flash_ms")) if t)
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["sage_ms"]
    row["speedup_vs_best_sdpa"] = best / row["sage_ms"]
    row["speedup_back_to_back"] = row["sdpa_back_to_back_ms"] / row["sage_back_to_back_ms"]
    row["speedup_gpu"] = row["sdpa_gpu_ms"] / row["sage_gpu_ms"]
    row["speedup_gpu_attention_kernel"] = row["sdpa_gpu_ms"] / statistics.median(kernel_rounds)
    row["sdpa_tflops"] = flops / row["sdpa_ms"] / 1e9
    row["sage_tflops"] = flops / row["sage_ms"] / 1e9
    del q, k, v
    torch.cuda.empty_cache()
    return row


def to_fp8_fast(model):
    """The model's block Linears as FP8Linear (bench_model.fp8_linears_) with the fp8 matmul on
    (quantization 'fp8_e4m3fn_fast'). -> whether it is active."""
    from bench_model import fp8_linears_
    from wanvideo.engine import set_fp8_fast
    fp8_linears_(model.blocks)
    return set_fp8_fast(model, True)


def bench_step(resolution, with_sample, with_fp8=False):
    """The whole 14B model (random weights, 40 blocks): one sampling step at cfg 5 (both branches,
    as sample_video runs them) at `resolution` with sdpa, sage_triton and auto, seconds each (after a
    warm-up step: cuDNN's plans, the kernel's tuning, auto's decisions). With `with_sample`, a 3-step
    480p sample (unipc, cfg 5, shift 5) with each, and the relative error of the final latents
    against sdpa's, beside two references for scale: SDPA's flash backend instead of cuDNN (bf16
    rounding alone) and the fp8 weight path (block Linears through e4m3 with a per-tensor scale, as
    quantization 'fp8_e4m3fn' stores them). With `with_fp8` (instead of sage_triton's step): auto's step
    again with the block Linears in fp8 and the fp8 matmul (quantization 'fp8_e4m3fn_fast'), last."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from bench_model import LATENT_FRAMES, RESOLUTIONS, build_ours
    from wanvideo.quantization import quantizable_linear_names, quantize_weight
    from wanvideo.sampling.loop import Conditioning, sample_video
    torch.manual_seed(0)
    model = build_ours("14B")
    g = torch.Generator("cuda").manual_seed(1)
    pos = Conditioning(context=[torch.randn(512, 4096, device="cuda", generator=g)])
    neg = Conditioning(context=[torch.randn(512, 4096, device="cuda", generator=g)])

    def sample(res, steps):
        h, w = RESOLUTIONS[res]
        noise = torch.randn(1, 16, LATENT_FRAMES, h, w, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = sample_video(model, noise, pos, neg, steps=steps, cfg=5.0, shift=5.0, progress=False)
        torch.cuda.synchronize()
        return out, time.perf_counter() - start

    row = {"case": f"14B_step_{resolution}"}

    def time_step(label, backend):
        """One warm-up step, one timed step (about 2% apart between calls) with `backend`, as `label`."""
        model.set_attention_backend(backend)
        sample(resolution, 1)
        row[f"{label}_step_s"] = sample(resolution, 1)[1]
        row[f"{label}_50_steps_s"] = 50 * row[f"{label}_step_s"]
        row[f"speedup_{label}"] = row["sdpa_step_s"] / row[f"{label}_step_s"]

    try:
        for backend in ("sdpa", "auto") if with_fp8 else ("sdpa", "sage_triton", "auto"):
            time_step(backend, backend)
    except Exception as error:  # keep the sample's part
        row["step_error"] = error_text(error, 500)
    if with_sample:  # errors only: the samples' times include each 480p shape's first use
        latents = {}
        for backend in ("sdpa", "sage_triton", "auto"):
            model.set_attention_backend(backend)
            latents[backend] = sample("480p", 3)[0]
        model.set_attention_backend("sdpa")
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            latents["sdpa_flash"] = sample("480p", 3)[0]
        with torch.no_grad():  # last: the weights are changed in place
            for name in quantizable_linear_names(model):
                weight = model.get_submodule(name).weight
                fp8, scale = quantize_weight(weight, torch.float8_e4m3fn)
                weight.copy_(fp8.to(weight.dtype) * scale.to(weight.dtype))
        latents["fp8_weights"] = sample("480p", 3)[0]
        for name, value in latents.items():
            if name != "sdpa":
                row[f"sample_480p_rel_err_{name}"] = rel_err(value, latents["sdpa"])
    if with_fp8:
        try:
            row["fp8_fast_active"] = to_fp8_fast(model)
            time_step("auto_fp8", "auto")
        except Exception as error:
            row["fp8_error"] = error_text(error, 500)
    model.set_attention_backend("sdpa")
    del model
    torch.cuda.empty_cache()
    return row


def bench_block(resolution, iters, compiled=False):
    """One Wan 2.1 14B block at `resolution`, sdpa against sage_triton and auto; with `compiled`, also
    under per-block torch.compile (compile_blocks) with sdpa and with auto."""
    import torch
    from bench_model import LATENT_FRAMES, RESOLUTIONS, build_ours, event_time_ms
    from wanvideo.modules import attention as attention_module
    frames, (h, w) = LATENT_FRAMES, RESOLUTIONS[resolution]
    torch.manual_seed(0)
    model = build_ours("14B", layers=1)
    x = [torch.randn(16, frames, h, w, device="cuda")]
    t = torch.tensor([500.0], device="cuda")
    context = [torch.randn(512, 4096, device="cuda")]
    row = {"case": f"14B_block_{resolution}", "tokens": frames * (h // 2) * (w // 2)}
    with torch.inference_mode():
        tok, ctx, _, _ = model.embed(x, t, context)
        block = model.blocks[0]
        ref = block(tok, ctx)
        row["sdpa_ms"] = event_time_ms(lambda: block(tok, ctx), iters=iters, warmup=2)
        model.set_attention_backend("sage_triton")
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = block(tok, ctx)
        torch.cuda.synchronize()
        row["sage_first_call_s"] = time.perf_counter() - start
        row["sage_ms"] = event_time_ms(lambda: block(tok, ctx), iters=iters, warmup=2)
        row["rel_err_vs_sdpa"] = rel_err(out, ref)
        # the block's output is x + its updates: the error of the update alone says more
        row["update_rel_err_vs_sdpa"] = rel_err(out - tok, ref - tok)
        # 'auto': the first call times both per attention shape (self and cross), later calls look it up
        model.set_attention_backend("auto")
        block(tok, ctx)
        row["auto_ms"] = event_time_ms(lambda: block(tok, ctx), iters=iters, warmup=1)
        row["auto_choices"] = {str(key[1:4]): choice for key, choice in attention_module.AUTO.decisions.items()
                               if key[1][1] == row["tokens"]}  # this block's shapes (AUTO is the process's)
        if compiled:  # per-block torch.compile: the 8-bit kernel runs outside the graph (a break at each attention)
            from wanvideo.engine import compile_blocks, uncompile_blocks
            try:
                for backend in ("sdpa", "auto"):
                    uncompile_blocks(model)
                    model.set_attention_backend(backend)
                    compile_blocks(model)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    block(tok, ctx)
                    torch.cuda.synchronize()
                    row[f"compiled_{backend}_first_call_s"] = time.perf_counter() - start
                    row[f"compiled_{backend}_ms"] = event_time_ms(lambda: block(tok, ctx), iters=iters, warmup=2)
            except Exception as error:  # keep the eager figures
                row["compiled_error"] = error_text(error, 500)
            uncompile_blocks(model)
        model.set_attention_backend("sdpa")
    row["speedup"] = row["sdpa_ms"] / row["sage_ms"]
    del model, tok, ctx, ref, out
    torch.cuda.empty_cache()
    return row


def main():
    args = parse_args()
    import torch
    import triton
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU.")
    from bench_model import event_time_ms
    from wanvideo.modules import sage_triton

    start = time.time()
    capability = torch.cuda.get_device_capability(0)
    info = {"device": torch.cuda.get_device_name(0), "capability": f"{capability[0]}.{capability[1]}",
            "torch": torch.__version__, "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
            "pv": "fp8 e4m3" if sage_triton.fp8_supported(torch.device("cuda", 0)) else "fp16 (no fp8 tensor cores)"}
    print(json.dumps(info), flush=True)
    results, blocks, steps = [], [], []

    def guarded(case, measure, rows):
        """rows gets measure()'s row, or the case's error (the other cases go on); printed as it comes."""
        try:
            row = measure()
        except Exception as error:
            row = {"case": case, "error": error_text(error, 1000)}
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in args.cases:
        guarded(name, lambda: bench_case(name, args.iters, event_time_ms), results)
    if not args.no_block:
        for resolution in [r for r in args.block_resolutions.split(",") if r]:
            guarded(f"14B_block_{resolution}", lambda: bench_block(resolution, args.iters, args.compile), blocks)
    if args.step:
        resolution, *extra = args.step.split(",")
        guarded(f"14B_step_{resolution}", lambda: bench_step(resolution, "sample" in extra, "fp8" in extra), steps)
    kernel = sage_triton._sage_attention_kernel
    info["tuned_configs"] = {str(key): str(config) for key, config in getattr(kernel, "cache", {}).items()}
    info["seconds"] = time.time() - start

    out_dir = os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "out"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention.json"), "w") as f:
        json.dump({"info": info, "attention": results, "blocks": blocks, "steps": steps}, f, indent=1)

    print(f"\n{info['device']} (sm {info['capability']})  torch {info['torch']}  triton {info['triton']}  "
          f"P/V {info['pv']}  {info['seconds']:.0f} s")
    fmt = lambda value, spec: "-" if value is None else format(value, spec)
    print(f"{'case':<30} {'sdpa ms':>8} {'cudnn':>8} {'flash':>8} {'sage ms':>8} {'kernel':>7} {'quant':>6} "
          f"{'x sdpa':>7} {'x best':>7} {'TF/s':>5} {'err/sdpa':>9} {'sdpa/ex':>8} {'sage/ex':>8} {'fp16PV ms':>9} "
          f"{'triton ms':>9} {'x b2b':>6} {'x GPU':>6} {'x kern':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<30} FAILED {r['error'][:200]}")
            continue
        print(f"{r['case']:<30} {r['sdpa_ms']:>8.2f} {fmt(r.get('sdpa_cudnn_ms'), '8.2f'):>8} "
              f"{fmt(r.get('sdpa_flash_ms'), '8.2f'):>8} {r['sage_ms']:>8.2f} {r['sage_kernel']:>7} "
              f"{r['sage_quantize_ms']:>6.2f} {r['speedup_vs_sdpa']:>7.2f} {r['speedup_vs_best_sdpa']:>7.2f} "
              f"{r['sage_tflops']:>5.0f} {r['sage_rel_err_vs_sdpa']:>9.4f} {r['sdpa_rel_err_vs_exact']:>8.4f} "
              f"{r['sage_rel_err_vs_exact']:>8.4f} {fmt(r.get('sage_fp16pv_ms'), '9.2f'):>9} "
              f"{fmt(r.get('sage_triton_kernel_ms'), '9.2f'):>9} {r['speedup_back_to_back']:>6.2f} "
              f"{r['speedup_gpu']:>6.2f} {r['speedup_gpu_attention_kernel']:>6.2f}")
    for r in blocks:
        if "error" in r:
            print(f"{r['case']:<30} FAILED {r['error'][:200]}")
            continue
        print(f"{r['case']:<30} sdpa {r['sdpa_ms']:.1f} ms  sage {r['sage_ms']:.1f} ms  x{r['speedup']:.2f}  "
              f"rel err {r['rel_err_vs_sdpa']:.4f} (update {r['update_rel_err_vs_sdpa']:.4f})  "
              f"auto {r['auto_ms']:.1f} ms {r['auto_choices']}")
        if "compiled_sdpa_ms" in r:
            print(f"{'':<30} compiled: sdpa {r['compiled_sdpa_ms']:.1f} ms  auto {r['compiled_auto_ms']:.1f} ms "
                  f"(first calls {r['compiled_sdpa_first_call_s']:.0f} s, {r['compiled_auto_first_call_s']:.0f} s)")
    for r in steps:
        print(json.dumps(r))
    print("tuned:", info["tuned_configs"])


if __name__ == "__main__":
    main()
