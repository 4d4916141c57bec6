"""Every strategy on 2, 4 and 8 GPUs against one GPU, in one call (issue "Measure every strategy").

For each case, a random real-size bf16 checkpoint is written once; each configuration is loaded
(time to first step measured: load, worker start and one step), runs timed denoising steps with
cfg 5 on the same seed, and is compared with the one-GPU output of the same call (relative L2
error). Cases ending in `_cfg1` run at guidance scale 1 (distilled models: no uncond branch, so
only sequence parallelism can help). GPU memory per card comes from NVML (worker processes
included). Writes multi_gpu.json and multi_gpu.png to $OUT.

    python benchmarks/bench_multi_gpu.py                   # every GPU of the machine, every case
    python benchmarks/bench_multi_gpu.py --cases 14B_720p,14B_720p_cfg1
    python benchmarks/bench_multi_gpu.py --cases 14B_720p_sharded,1.3B_480p_group1   # weight sharding (FSDP2):
        # distributed x2 with shard_weights 'on' next to 'off' (step time, peak memory per GPU, same output),
        # and a group of one on one GPU with sharding on and off (must give the same output)
    python benchmarks/bench_multi_gpu.py --cases 14B_720p --attention sdpa,sage_triton   # the 8-bit attention too
    python benchmarks/bench_multi_gpu.py --dry-run         # tiny model on CPU devices (gloo): checks the script

A PROJECTION of 2, 4 and 8 GPUs from one GPU (benchmarks/projection.py: rank 0's share of the work
timed through the real distributed code with local stand-ins for the collectives, plus the bytes of
every collective over NVLink 4 / PCIe 5.0 / PCIe 4.0): projection.json, projection.png and a Markdown
table labelled 'projection (not measured)', with measured figures and the projection's error beside it:

    python benchmarks/bench_multi_gpu.py --project --measured benchmarks/raw/2026-11-29_h200x2_720p_multi_gpu.json \\
        benchmarks/raw/2026-11-29_h200x2_remeasure_multi_gpu.json     # one GPU, about 2 minutes on an H200
    python benchmarks/bench_multi_gpu.py --project --dry-run   # tiny model on the CPU in seconds
    (2026-11-29_h200x2_480p_multi_gpu.json adds 1.3B 480p cfg 1, measured against an eager baseline: RESULTS.md (*))
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import multi_gpu_utils  # noqa: E402
from wanvideo.latent_format import latent_frame_count  # noqa: E402
from wanvideo.modules.attention import BACKENDS  # noqa: E402
from wanvideo.parallel import load_parallel_pipeline  # noqa: E402
from wanvideo.pipeline import LoadSettings, load_pipeline  # noqa: E402
from wanvideo.engine import BlockSwapSettings  # noqa: E402
from wanvideo.sampling import Conditioning, make_noise  # noqa: E402

SIZES = {"1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
         "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)}
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720), "tiny": (64, 48)}


def write_checkpoint(size, path, dry_run):
    if os.path.exists(path):  # one random checkpoint per size and call, shared by its cases
        return path
    if dry_run:
        from wanvideo.tiny import make_tiny_checkpoint
        make_tiny_checkpoint(path, "t2v", text_dim=4096, num_heads=6, dim=96)
        return path
    from safetensors.torch import save_file
    from wanvideo.checkpoint import build_meta_model
    model = build_meta_model(dict(SIZES[size], model_type="t2v", in_dim=16)).to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if "norm" not in name else p.fill_(1.0)
    save_file({k: v.to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}, path)
    del model
    torch.cuda.empty_cache()
    return path


def run_config(name, build, noise, positive, negative, steps, reference, rows, devices, cfg=5.0):
    started = time.perf_counter()
    try:
        pipeline = build()
        load_s = time.perf_counter() - started
        run = lambda n: pipeline.generate(noise, positive, negative, steps=n, cfg=cfg, shift=5.0, progress=False)
        run(1)  # warm-up: compiles the fused kernels for this shape, starts every worker
        first_step_s = time.perf_counter() - started
        with multi_gpu_utils.monitor_memory_usage(interval=0.2) as memory:
            began = time.perf_counter()
            out = run(steps)
            step_s = (time.perf_counter() - began) / steps
        pipeline.unload()
    except Exception as error:  # report and go on: one call must bring back every other figure
        rows.append(dict(config=name, error=repr(error)))
        print(json.dumps(rows[-1]), flush=True)
        return None
    row = dict(config=name, gpus=len(devices), cfg=cfg, step_s=step_s, load_s=load_s, first_step_s=first_step_s,
               peak_GiB={str(k): v / 2**30 for k, v in memory.peak_bytes.items()})
    if reference is not None:
        row["rel_err_vs_1gpu"] = ((out - reference).norm() / reference.norm()).item()
    rows.append(row)
    print(json.dumps(row), flush=True)
    return out


def bench_case(size, resolution, strategies, gpu_counts, steps, dry_run, rows, cfg=5.0, label=None, attention="sdpa"):
    path = write_checkpoint(size, f"/tmp/wan_{size}_random{'_tiny' if dry_run else ''}.safetensors", dry_run)
    width, height = RESOLUTIONS["tiny" if dry_run else resolution]
    noise = make_noise((1, 16, latent_frame_count(81 if not dry_run else 9), height // 8, width // 8), seed=1)
    g = torch.Generator().manual_seed(2)
    positive, negative = Conditioning([torch.randn(40, 4096, generator=g)]), Conditioning([torch.randn(20, 4096, generator=g)])
    settings = LoadSettings(base_precision="fp32" if dry_run else "bf16", attention_mode=attention)
    device = lambda i: torch.device("cpu") if dry_run else torch.device("cuda", i)
    case = label or f"{size}_{resolution}" + ("_cfg1" if cfg == 1 else "")
    one = [device(0)]
    reference = run_config(f"{case} 1 GPU", lambda: load_pipeline(path, one[0], settings), noise, positive, negative,
                           steps, None, rows, one, cfg)
    outputs = {}
    for strategy in strategies:
        for count in gpu_counts:
            devices = [device(i) for i in range(count)]
            name, kwargs = strategy, {}
            if strategy == "block_distribution_no_pipeline":
                name, kwargs = "block_distribution", {"pipeline_branches": False}
            if strategy.startswith("distributed"):  # explicit, so 'off' and 'on' are what the rows say
                name, kwargs = "distributed", {"shard_weights": "on" if strategy == "distributed_sharded" else "off"}
            outputs[strategy, count] = run_config(f"{case} {strategy} x{count}",
                       lambda: load_parallel_pipeline(path, name, settings=settings, devices=devices,
                                                      width=width, height=height, **kwargs),
                       noise, positive, negative, steps, reference, rows, devices, cfg)
    for count in gpu_counts:  # weight sharding must not change the output
        sharded, whole = outputs.get(("distributed_sharded", count)), outputs.get(("distributed", count))
        if sharded is not None and whole is not None:
            rows.append(dict(config=f"{case} sharded vs unsharded x{count}",
                             rel_err=((sharded - whole).norm() / whole.norm()).item()))
            print(json.dumps(rows[-1]), flush=True)
    if "block_distribution" in strategies:
        swapped = 2 if dry_run else 20
        run_config(f"{case} 1 GPU + block swap {swapped}", lambda: load_pipeline(path, one[0], LoadSettings(
            base_precision=settings.base_precision, attention_mode=attention,
            block_swap=BlockSwapSettings(blocks_to_swap=swapped))),
            noise, positive, negative, steps, reference, rows, one, cfg)


def chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    baselines = {r["config"].split(" ")[0]: r["step_s"] for r in rows if r["config"].endswith("1 GPU") and "step_s" in r}
    series = {}
    for r in rows:
        if "step_s" not in r or " x" not in r["config"]:
            continue
        case, label = r["config"].split(" ")[0], r["config"].split(" ")[1]
        series.setdefault(f"{case} {label}", []).append((r["gpus"], baselines[case] / r["step_s"]))
    for label, points in series.items():
        axis.plot(*zip(*sorted(points)), marker="o", label=label)
    axis.plot([1, 8], [1, 8], color="grey", linestyle=":", label="linear")
    axis.set(xlabel="GPUs", ylabel="speed-up over one GPU (same call)", title="Wan 2.1 seconds per step")
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main():
    if "--project" in sys.argv[1:]:  # the projection has options of its own (projection.py)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from projection import main as project
        project([a for a in sys.argv[1:] if a != "--project"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU devices: checks the script")
    parser.add_argument("--project", action="store_true",
                        help="the one-GPU projection of 2, 4 and 8 GPUs instead (options: projection.py --help)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", default="14B_720p,14B_720p_cfg1,1.3B_480p,1.3B_480p_cfg1,14B_480p,14B_480p_cfg1")
    parser.add_argument("--attention", default="sdpa",
                        help="attention modes, comma-separated: each case runs once per mode, in turn (e.g. "
                             "sdpa,sage_triton); rows of modes other than sdpa are labelled case_mode")
    args = parser.parse_args()
    available = 4 if args.dry_run else torch.cuda.device_count()
    counts = [n for n in (2, 4, 8) if n <= available]
    plans = {"14B_720p": ["distributed"], "1.3B_480p": ["data_parallel", "distributed"],
             "14B_480p": ["block_distribution", "block_distribution_no_pipeline"],
             # cfg 1: one branch, so only sequence parallelism (Ulysses / ring) splits the work
             "14B_720p_cfg1": ["distributed"], "1.3B_480p_cfg1": ["distributed"], "14B_480p_cfg1": ["distributed"],
             # weight sharding: 2 GPUs each holding half the weights, and a group of one (same output on and off)
             "14B_720p_sharded": ["distributed", "distributed_sharded"],
             "1.3B_480p_group1": ["distributed", "distributed_sharded"]}
    fixed_counts = {"14B_480p": [2], "14B_720p_sharded": [2], "1.3B_480p_group1": [1]}
    modes = args.attention.split(",")
    for mode in modes:
        if mode not in BACKENDS:
            parser.error(f"unknown attention mode {mode!r}; choose from {', '.join(BACKENDS)}")
    rows = []
    for case in args.cases.split(","):
        if case not in plans:
            parser.error(f"unknown case {case!r}; choose from {', '.join(plans)}")
        size, resolution = case.split("_")[:2]
        case_counts = [n for n in fixed_counts.get(case, counts) if n <= available]
        for mode in modes:
            bench_case(size, resolution, plans[case], case_counts, args.steps, args.dry_run, rows,
                       cfg=1.0 if case.endswith("_cfg1") else 5.0, label=case if mode == "sdpa" else f"{case}_{mode}",
                       attention=mode)
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    info = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                gpus=available, torch=torch.__version__, dry_run=args.dry_run)
    json.dump({"info": info, "results": rows}, open(os.path.join(out, "multi_gpu.json"), "w"), indent=1)
    chart(rows, os.path.join(out, "multi_gpu.png"))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
