"""Start-up of the 'distributed' strategy against the plain single-process load (issue 13, item 5).

Measures, on one GPU, in a fresh process each time (a host that has imported torch and set up
CUDA, as ComfyUI has, and nothing else):
  plain        load_pipeline + the first denoising step
  distributed  load_parallel_pipeline('distributed') with a group of one (shard_weights 'off') +
               the first step, with the workers' phase breakdown (DistributedWanRunner.startup_seconds:
               spawn, imports, cuda_init, process_group, weights, then first_step inside the worker)
  restart      in the same process, the group stopped (step_aside) and started again + its first
               step: what a ComfyUI session pays after the first start (the forkserver is warm)
The first repeat of each is reported apart as 'cold' (it fills the page cache and the compiler's
disk cache for this shape); the medians are over the others. Target: distributed within 1.5x of
plain. Random weights are written once per size to /tmp. Writes startup.json to $OUT (else
benchmarks/out) and prints a table.

    python benchmarks/bench_startup.py                       # GPU 0: Wan 1.3B (480p, 81 frames) and tiny
    python benchmarks/bench_startup.py --sizes tiny --repeats 5
    python benchmarks/bench_startup.py --dry-run             # CPU (gloo): a tiny and a larger random model
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# Model sizes: the real Wan 2.1 1.3B, a larger random model for CPU runs, and the built-in tiny one.
SIZES = {"1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
         "medium": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=6),
         "tiny": None}
CHILD_TIMEOUT_S = 240  # one measurement; a hung one must not eat a whole device call
# The workers' phases in order; compiler_imports (GPU) runs after 'ready', before the first request.
PHASES = ("spawn", "imports", "cuda_init", "process_group", "weights", "compiler_imports", "first_step")


def checkpoint_path(size, dry_run):
    return f"/tmp/wan_startup_{size}{'_cpu' if dry_run else ''}.safetensors"


def write_checkpoint(size, path, dry_run):
    """Random weights of `size` (bf16 on GPU runs, fp32 on CPU), written once and reused."""
    import torch
    from safetensors.torch import save_file
    from wanvideo.tiny import make_tiny_checkpoint
    if os.path.exists(path):
        return path
    if SIZES[size] is None:
        make_tiny_checkpoint(path, "t2v", text_dim=4096, num_heads=6, dim=96,
                             dtype=torch.float32 if dry_run else torch.bfloat16)
        return path
    from wanvideo.checkpoint import build_meta_model
    device = "cpu" if dry_run else "cuda"
    model = build_meta_model(dict(SIZES[size], model_type="t2v", in_dim=16)).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if "norm" not in name else p.fill_(1.0)
    dtype = torch.float32 if dry_run else torch.bfloat16
    save_file({k: v.to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}, path + ".part")
    os.replace(path + ".part", path)  # never leave half a file under the name a later call reuses
    del model
    if not dry_run:
        torch.cuda.empty_cache()
    return path


def child(args):
    """One measurement in this fresh process; prints one JSON line."""
    import torch
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":  # the host (ComfyUI) has its CUDA context before any model loads
        torch.empty(1, device=device)
        torch.cuda.synchronize()
    from wanvideo.latent_format import latent_frame_count
    from wanvideo.parallel import load_parallel_pipeline
    from wanvideo.pipeline import LoadSettings, load_pipeline
    from wanvideo.sampling import Conditioning, make_noise

    width, height, frames = args.width, args.height, args.frames
    noise = make_noise((1, 16, latent_frame_count(frames), height // 8, width // 8), seed=1)
    g = torch.Generator().manual_seed(2)
    positive = Conditioning([torch.randn(40, 4096, generator=g)])
    negative = Conditioning([torch.randn(20, 4096, generator=g)])
    settings = LoadSettings(base_precision="fp32" if args.dry_run else "bf16")

    def first_step(pipeline):
        pipeline.generate(noise, positive, negative, steps=1, cfg=5.0, shift=5.0, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()

    row = dict(mode=args.child)
    began = time.perf_counter()
    if args.child == "plain":
        pipeline = load_pipeline(args.model, device, settings)
        row["load_s"] = time.perf_counter() - began
        first_step(pipeline)
        row["total_s"] = time.perf_counter() - began
    else:
        pipeline = load_parallel_pipeline(args.model, "distributed", settings=settings, devices=[device],
                                          width=width, height=height, num_frames=frames, shard_weights="off")
        row["load_s"] = time.perf_counter() - began
        first_step(pipeline)
        row["total_s"] = time.perf_counter() - began
        row["phases"] = dict(pipeline.runner.startup_seconds)
        pipeline.step_aside()  # the group stops; the next run starts a fresh one (a warm forkserver)
        began = time.perf_counter()
        pipeline.come_back()
        first_step(pipeline)
        row["restart_total_s"] = time.perf_counter() - began
        row["restart_phases"] = dict(pipeline.runner.startup_seconds)
    pipeline.unload()
    print("RESULT " + json.dumps(row), flush=True)


def run_child(args, mode, model):
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", model,
               "--width", str(args.width), "--height", str(args.height), "--frames", str(args.frames)]
    if args.dry_run:
        command.append("--dry-run")
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return dict(mode=mode, error=f"no result in {CHILD_TIMEOUT_S} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return dict(mode=mode, error=(done.stderr or done.stdout)[-2000:])
    return json.loads(lines[-1][len("RESULT "):])


def median(rows, key, phase=None):
    values = [(r[key] if phase is None else r[key].get(phase)) for r in rows if key in r]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(size, rows):
    """Medians of the warm repeats (all repeats when only one ran) and the cold first ones."""
    summary = dict(size=size)
    for mode in ("plain", "distributed"):
        ok = [r for r in rows if r["mode"] == mode and "error" not in r]
        warm = ok[1:] or ok
        summary[mode] = dict(cold_total_s=ok[0]["total_s"] if ok else None, total_s=median(warm, "total_s"),
                             load_s=median(warm, "load_s"), repeats=len(warm))
        if mode == "distributed" and ok:
            summary[mode]["phases"] = {p: median(warm, "phases", p) for p in PHASES + ("until_ready",)}
            summary[mode]["restart_total_s"] = median(ok, "restart_total_s")
            summary[mode]["restart_phases"] = {p: median(ok, "restart_phases", p) for p in PHASES}
    plain, dist = summary["plain"]["total_s"], summary["distributed"]["total_s"]
    if plain and dist:
        summary["ratio"] = dist / plain
        summary["restart_ratio"] = (summary["distributed"]["restart_total_s"] or 0) / plain
        summary["within_target"] = summary["ratio"] <= 1.5
    return summary


def table(summaries):
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["size    | plain load+step s | distributed s (cold) | ratio | restart s (ratio) | " + " | ".join(PHASES),
             "--------|-------------------|----------------------|-------|-------------------|" +
             "|".join("-" * (len(p) + 2) for p in PHASES)]
    for s in summaries:
        d = s["distributed"]
        phases = d.get("phases", {})
        lines.append(f"{s['size']:<7} | {fmt(s['plain']['total_s']):>17} | "
                     f"{fmt(d['total_s']):>6} ({fmt(d['cold_total_s'])}) {'':>6} | {fmt(s.get('ratio')):>5} | "
                     f"{fmt(d.get('restart_total_s')):>6} ({fmt(s.get('restart_ratio'))}) {'':>3} | "
                     + " | ".join(f"{fmt(phases.get(p)):>{len(p)}}" for p in PHASES))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU devices (gloo), tiny and medium models")
    parser.add_argument("--sizes", default=None, help="comma list of 1.3B, medium, tiny "
                        "(default: 1.3B,tiny on a GPU, medium,tiny with --dry-run)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="fresh processes per mode and size (the first is reported as cold; default 2)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--child", choices=("plain", "distributed"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    small = (64, 48, 9)  # latent 3 x 6 x 8
    args.width, args.height, args.frames = (v if v is not None else d for v, d in
                                            zip((args.width, args.height, args.frames),
                                                small if args.dry_run else (832, 480, 81)))
    if args.child:
        return child(args)

    import torch
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --dry-run for the CPU check")
    sizes = (args.sizes or ("medium,tiny" if args.dry_run else "1.3B,tiny")).split(",")
    for size in sizes:
        if size not in SIZES:
            parser.error(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    began = time.perf_counter()
    summaries, raw = [], {}
    out = os.environ.get("OUT", os.path.join(REPO_ROOT, "benchmarks", "out"))
    os.makedirs(out, exist_ok=True)
    info = dict(device=torch.cuda.get_device_name(0) if not args.dry_run else "cpu", torch=torch.__version__,
                dry_run=args.dry_run, repeats=args.repeats, shape=[args.width, args.height, args.frames])
    for size in sizes:
        path = write_checkpoint(size, checkpoint_path(size, args.dry_run), args.dry_run)
        rows = []
        for repeat in range(args.repeats):  # alternating, so drift of the machine hits both alike
            for mode in ("plain", "distributed"):
                rows.append(dict(run_child(args, mode, path), repeat=repeat))
                print(json.dumps(dict(size=size, **rows[-1])), flush=True)
        raw[size] = rows
        summaries.append(summarize(size, rows))
        info["wall_s"] = time.perf_counter() - began
        with open(os.path.join(out, "startup.json"), "w") as f:  # after each size: a cut-off call keeps the rest
            json.dump(dict(info=info, summary=summaries, runs=raw), f, indent=1)
    print(table(summaries))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
