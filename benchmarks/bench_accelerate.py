"""Our loader and block swap against accelerate's, on the same random real-size checkpoint.

Two questions the design section of the guide answers with these figures:
  load     seconds and peak host memory (RSS) to load a bf16 checkpoint: our load_wan_model (one
           tensor at a time from the memory-mapped file straight to its device) against accelerate's
           init_empty_weights + load_checkpoint_and_dispatch. Each load runs in a fresh process so
           the peak RSS is its own.
  offload  seconds per forward with the first N blocks resting in CPU memory: our block swap (one
           packed pinned buffer per block, copy stream, prefetch) against accelerate's
           dispatch_model with those blocks mapped to "cpu" (hooks that move each block's weights
           when it runs). GPU only.

    python benchmarks/bench_accelerate.py --size 1.3B --parts load            # CPU is fine
    python benchmarks/bench_accelerate.py --size 14B --parts load,offload --swap 20
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {"1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
         "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)}


def write_checkpoint(size, path):
    if os.path.exists(path):
        return
    from safetensors.torch import save_file
    from wanvideo.checkpoint import build_meta_model
    model = build_meta_model(dict(SIZES[size], model_type="t2v", in_dim=16)).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = torch.ones_like(tensor) if "norm" in name else torch.randn(tensor.shape, generator=generator) * 0.02
        state[name] = tensor.to(torch.bfloat16).contiguous()
    save_file(state, path)


def _load(loader, path, device):
    if loader == "ours":
        from wanvideo.checkpoint import load_wan_model
        return load_wan_model(path, device, base_precision="bf16")
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from wanvideo.checkpoint import inspect_checkpoint
    from wanvideo.modules.model import WanModel
    with init_empty_weights():
        model = WanModel(**inspect_checkpoint(path).config)
    return load_checkpoint_and_dispatch(model, path, device_map={"": device}, dtype=torch.bfloat16)


def load_once(loader, path, device):
    """Runs in its own process: (first load s, second load s, peak RSS GiB). The first load pays
    the process' one-off costs (imports, PyTorch's first meta-device initialisation); the second is
    what a reload in a running ComfyUI costs."""
    times = []
    for _ in range(2):
        began = time.perf_counter()
        model = _load(loader, path, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        assert next(model.parameters()).device.type == device.split(":")[0]
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return times[0], times[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def compare_loads(path, device, repeats):
    rows = []
    for loader in ("ours", "accelerate") * repeats:
        output = subprocess.run([sys.executable, __file__, "--load-once", loader, "--checkpoint", path,
                                 "--device", device], capture_output=True, text=True, check=True).stdout
        first, again, rss = json.loads(output.strip().splitlines()[-1])
        rows.append(dict(part="load", loader=loader, device=device, first_load_s=first, second_load_s=again,
                         peak_rss_gib=rss))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def compare_offload(path, swapped, steps):
    from accelerate import dispatch_model
    from wanvideo.checkpoint import load_wan_model
    from wanvideo.engine import BlockSwapSettings, enable_block_swap
    from wanvideo.modules.model import WanModel  # noqa: F401 - the class accelerate wraps
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 21, 60, 104, generator=g).cuda()] * 2       # 480p, 81 frames; cond + uncond
    t, context = torch.tensor([500.0, 500.0], device="cuda"), [torch.randn(512, 4096, generator=g).cuda()] * 2

    def time_forward(model):
        with torch.inference_mode():
            model(x, t, context)  # warm-up
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(steps):
                out = model(x, t, context)
            torch.cuda.synchronize()
        return (time.perf_counter() - began) / steps, out[0].float().cpu()

    rows = []
    for variant in ("resident", "ours", "accelerate"):
        model = load_wan_model(path, "cuda" if variant == "resident" else "cpu", base_precision="bf16")
        torch.cuda.reset_peak_memory_stats()
        if variant == "ours":
            swapper = enable_block_swap(model, "cuda", BlockSwapSettings(blocks_to_swap=swapped))
        elif variant == "accelerate":
            device_map = {name: 0 for name, _ in model.named_children() if name != "blocks"}
            device_map.update({f"blocks.{i}": "cpu" if i < swapped else 0 for i in range(len(model.blocks))})
            model = dispatch_model(model, device_map=device_map, main_device=torch.device("cuda", 0))
        seconds, out = time_forward(model)
        if variant == "resident":
            reference = out
        rows.append(dict(part="offload", variant=variant, swapped=0 if variant == "resident" else swapped,
                         seconds_per_forward=seconds, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                         rel_err_vs_resident=((out - reference).norm() / reference.norm()).item()))
        print(json.dumps(rows[-1]), flush=True)
        if variant == "ours":
            swapper.remove(restore_device="cpu")
        del model
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.3B", choices=list(SIZES))
    parser.add_argument("--parts", default="load", help="comma-separated: load, offload")
    parser.add_argument("--swap", type=int, default=20, help="blocks resting in CPU memory for 'offload'")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="loads of each loader, alternating")
    parser.add_argument("--load-once", choices=("ours", "accelerate"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help="device for 'load' (default cuda if present, else cpu)")
    args = parser.parse_args()
    if args.load_once:
        print(json.dumps(load_once(args.load_once, args.checkpoint, args.device)))
        return
    path = f"/tmp/wan_{args.size}_random_cpu.safetensors"
    write_checkpoint(args.size, path)
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    rows = []
    if "load" in args.parts:
        rows += compare_loads(path, device, args.repeats)
    if "offload" in args.parts:
        rows += compare_offload(path, args.swap, args.steps)
    out = os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "out"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"accelerate_{args.size}.json"), "w") as f:
        json.dump(dict(size=args.size, torch=torch.__version__, device=device, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
