"""Wan 2.2 A14B expert pair: the cost of switching experts, on one GPU and with expert_parallel.

A random real-size A14B expert (t2v, bf16, 28.6 GB) is written once and linked under a high-noise and
a low-noise name (the timing does not depend on the weights). On the official t2v schedule (40 steps,
shift 12, boundary 0.875: steps 0-25 high-noise, 26-39 low-noise), each placement runs the steps
`--each-side` before and after the switch (cfg 4.0 high / 3.0 low, cond and uncond as two calls, as
the official code does), every step timed to the device's end:
  resident     one GPU, both experts on it (no switch): the baseline;
  host_mirror  one GPU, the idle expert in pinned host memory, mirrored once (the default when both
               experts do not fit): the switch uploads one expert;
  step_aside   the same with the pipeline's own step_aside()/come_back() (copies out, then in);
  expert_parallel  (2+ GPUs) high-noise expert on cuda:0, low-noise on cuda:1; the latents hop.
  distributed  (2 GPUs) two worker groups on cuda:0 and cuda:1, one per expert (cond and uncond in
               one request: CFG parallel), both experts resident on both GPUs.
Rows: per-step seconds, the switch seconds (in the run) and the switch back (start of the next run),
and the extra time of a whole 40-step run over the resident baseline: (window - baseline window +
switch back) / (40-step baseline run). Writes experts.json to $OUT.

    python benchmarks/bench_experts.py                          # one GPU: resident, host_mirror, step_aside
    python benchmarks/bench_experts.py --placements resident,expert_parallel,distributed   # on 2 GPUs
    python benchmarks/bench_experts.py --dry-run                # tiny experts on CPU devices: checks the script
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wanvideo.latent_format import latent_frame_count  # noqa: E402
from wanvideo.parallel import experts as experts_module  # noqa: E402
from wanvideo.parallel.expert_residency import StepAside  # noqa: E402
from wanvideo.parallel.experts import load_expert_pair  # noqa: E402
from wanvideo.pipeline import LoadSettings  # noqa: E402
from wanvideo.sampling import flow_sigmas, make_noise  # noqa: E402
from wanvideo.sampling.experts import HIGH_NOISE, LOW_NOISE  # noqa: E402

MODELS = {"a14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, model_type="t2v", in_dim=16),
          # Wan 2.1 1.3B's shape: a quick GPU check of the code paths (figures are for a14b)
          "small": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, model_type="t2v", in_dim=16)}
STEPS, SHIFT, CFG_HIGH, CFG_LOW = 40, 12.0, 4.0, 3.0  # the official T2V-A14B settings


def sync(devices):
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def expert_files(folder, dry_run, model="a14b"):
    """(high-noise path, low-noise path): one random expert under two names (tiny: two seeds)."""
    names = [os.path.join(folder, f"wan2.2_t2v_{e}_random_{'tiny' if dry_run else model}.safetensors")
             for e in (HIGH_NOISE, LOW_NOISE)]
    if all(os.path.exists(n) for n in names):
        return names
    if dry_run:
        from wanvideo.tiny import make_tiny_checkpoint
        for seed, name in enumerate(names):
            make_tiny_checkpoint(name, "t2v", text_dim=4096, seed=seed)
        return names
    from safetensors.torch import save_file
    from wanvideo.checkpoint import build_meta_model
    target = os.path.join(folder, f"wan2.2_{model}_random_bf16.safetensors")
    if not os.path.exists(target):
        began = time.perf_counter()
        module = build_meta_model(MODELS[model]).to_empty(device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.normal_(0, 0.02) if "norm" not in name else p.fill_(1.0)
        save_file({k: v.contiguous().cpu() for k, v in module.state_dict().items()}, target)
        del module
        torch.cuda.empty_cache()
        print(json.dumps({"wrote": target, "seconds": round(time.perf_counter() - began, 1)}), flush=True)
    for name in names:
        if not os.path.exists(name):
            os.symlink(target, name)
    return names


def run_window(pipeline, noise, positive, negative, window, sigmas):
    """Steps `window` of the schedule with the pair's own expert moves -> (seconds per step, x, pair).
    Untimed forwards first (of the resident experts): a process's first kernels on a device start slowly."""
    pair = pipeline.expert_pair()  # the high-noise expert in place, as at the start of a run
    x, seconds = noise, []
    with torch.no_grad():
        warm_up = [pair.before_step(window[0], sigmas)]
        if not pipeline.idle_in_host:  # both resident (expert_parallel: the second GPU's first kernels too)
            warm_up.append(pair.experts[LOW_NOISE])
        for expert in warm_up:
            device = torch.device(expert.device)
            expert(list(x.to(device)), torch.full((1,), 900.0, device=device), [c.to(device) for c in positive])
        for i in window:
            devices = [pair.experts[n].device for n in (HIGH_NOISE, LOW_NOISE)]
            sync(devices)
            began = time.perf_counter()
            denoiser = pair.before_step(i, sigmas)
            device = torch.device(denoiser.device)
            x = x.to(device)
            t = torch.full((1,), sigmas[i].item() * 1000, device=device)
            if getattr(denoiser, "prefers_batched_cfg", False):  # a worker group: both branches in one request
                cond, uncond = denoiser([x[0], x[0]], t, [c.to(device) for c in positive + negative])
            else:
                cond = denoiser(list(x), t, [c.to(device) for c in positive])[0]
                uncond = denoiser(list(x), t, [c.to(device) for c in negative])[0]
            scale = CFG_HIGH if pair.uses_high_noise(sigmas[i]) else CFG_LOW
            x = x + (sigmas[i + 1].item() - sigmas[i].item()) * (uncond + scale * (cond - uncond))[None]
            sync(devices)
            seconds.append(time.perf_counter() - began)
    return seconds, x, pair


def bench(placement, paths, args, noise, positive, negative, rows, baseline):
    dry = args.dry_run
    device = lambda i: torch.device("cpu", i) if dry else torch.device("cuda", i)
    settings = LoadSettings(base_precision="fp32" if dry else "bf16", attention_mode=args.attention)
    kwargs = dict(settings=settings, width=args.width, height=args.height, num_frames=args.frames)
    original = experts_module.residency_for
    if placement == "step_aside":
        experts_module.residency_for = StepAside
    try:
        began = time.perf_counter()
        if placement in ("expert_parallel", "distributed"):
            pipeline = load_expert_pair(*paths, placement, devices=[device(0), device(1)], **kwargs)
        else:
            pipeline = load_expert_pair(*paths, "none", devices=[device(0)],
                                        idle_expert="resident" if placement == "resident" else "cpu", **kwargs)
        load_s = time.perf_counter() - began
        sigmas = flow_sigmas(STEPS, SHIFT)
        switch = pipeline.expert_pair().switch_step(sigmas)
        window = list(range(switch - args.each_side, switch + args.each_side))
        seconds, x, pair = run_window(pipeline, noise, positive, negative, window, sigmas)
        began = time.perf_counter()
        pipeline.come_back()  # the next run starts with the high-noise expert: the switch back
        sync([device(0), device(1)] if placement in ("expert_parallel", "distributed") else [device(0)])
        switch_back_s = time.perf_counter() - began
        row = dict(placement=placement, load_s=round(load_s, 1), window=window, switch_step=switch,
                   step_s=[round(s, 3) for s in seconds], switches=[(s, n, round(t, 3)) for s, n, t in pair.switches],
                   switch_back_s=round(switch_back_s if placement != "resident" else 0.0, 3),
                   describe=pipeline.describe())
        if baseline is not None:
            high = [s for i, s in zip(baseline["window"], baseline["step_s"]) if i < switch]
            low = [s for i, s in zip(baseline["window"], baseline["step_s"]) if i >= switch]
            run_s = switch * sum(high) / len(high) + (STEPS - switch) * sum(low) / len(low)  # 40 steps, resident
            extra_s = sum(seconds) - sum(baseline["step_s"]) + row["switch_back_s"]
            row.update(extra_per_40_step_run_s=round(extra_s, 3), extra_percent=round(100 * extra_s / run_s, 2),
                       baseline_40_step_run_s=round(run_s, 1),
                       rel_err_vs_resident=((x.cpu() - baseline["x"]).norm() / baseline["x"].norm()).item())
        pipeline.unload()
    except Exception as error:  # one call must bring back every other figure
        row = dict(placement=placement, error=repr(error))
    finally:
        experts_module.residency_for = original
    rows.append({k: v for k, v in row.items()})
    print(json.dumps(rows[-1], default=str), flush=True)
    return dict(row, x=x.cpu()) if "error" not in row else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny experts on CPU devices: checks the script")
    parser.add_argument("--placements", default="resident,host_mirror,step_aside",
                        help="comma-separated: resident (first: the baseline), host_mirror, step_aside, expert_parallel, "
                             "distributed")
    parser.add_argument("--each-side", type=int, default=3, help="steps timed before and after the switch")
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--folder", default="/tmp")
    parser.add_argument("--model", default="a14b", choices=list(MODELS), help="small: a quick check on a GPU")
    args = parser.parse_args()
    if args.dry_run:
        args.width, args.height, args.frames = 64, 48, 9
    paths = expert_files(args.folder, args.dry_run, args.model)
    noise = make_noise((1, 16, latent_frame_count(args.frames), args.height // 8, args.width // 8), seed=1)
    g = torch.Generator().manual_seed(2)
    positive, negative = [torch.randn(40, 4096, generator=g)], [torch.randn(20, 4096, generator=g)]
    rows, baseline = [], None
    for placement in args.placements.split(","):
        result = bench(placement, paths, args, noise, positive, negative, rows, baseline)
        if placement == "resident" and result is not None:
            baseline = result
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    info = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                gpus=torch.cuda.device_count(), torch=torch.__version__, dry_run=args.dry_run, model=args.model,
                size=f"{args.width}x{args.height}x{args.frames}", schedule=f"{STEPS} steps, shift {SHIFT}")
    with open(os.path.join(out, "experts.json"), "w") as f:
        json.dump({"info": info, "results": rows}, f, indent=1, default=str)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
