#!/usr/bin/env python3
"""Generate a Wan 2.1 video latent from Python, on one GPU, several, or the CPU.

With no arguments it runs anywhere, CPU-only machines included: it writes the built-in tiny Wan
model (random weights, real architecture) to the output folder, shows the GPUs it found, loads the
model, samples a few steps with a progress bar, prints timings and peak memory, and writes a preview
(an animated image of the latent through Wan's latent-to-RGB factors).

    python example_multi_gpu_usage.py                           # the built-in tiny model
    python example_multi_gpu_usage.py --model wan2.1_t2v_14B_bf16.safetensors --text-embeddings prompt.safetensors \\
        --width 832 --height 480 --frames 81 --steps 30 --parallelism auto --gpu-ids 0,1
"""
import argparse
import os
import sys
import time

import torch

try:
    import resource  # peak memory of this process; not on Windows
except ImportError:
    resource = None

from wanvideo import api


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Wan 2.1 .safetensors file; default: the built-in tiny model")
    p.add_argument("--text-embeddings", help="safetensors file with 'positive' (and optionally 'negative') umT5 "
                                             "embeddings [L, 4096]; default: random embeddings (for timing)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default 832; tiny model: 64)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default 480; tiny model: 48)")
    p.add_argument("--frames", type=int, default=None, help="video frames, 4n+1 (default 81; tiny model: 9)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; tiny model: 8)")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale; 1 skips the negative pass")
    p.add_argument("--shift", type=float, default=5.0, help="flow-matching timestep shift")
    p.add_argument("--scheduler", default="unipc", choices=list(api.SCHEDULERS), help="flow solver")
    p.add_argument("--seed", type=int, default=42, help="noise seed")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="base precision (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quantization", default="disabled", help="disabled, fp8_e4m3fn, fp8_e5m2, fp8_e4m3fn_fast")
    p.add_argument("--blocks-to-swap", type=int, default=0, help="blocks kept in pinned CPU memory (one GPU)")
    p.add_argument("--parallelism", default="none",
                   choices=["none", "auto", "data_parallel", "block_distribution", "distributed"],
                   help="multi-GPU strategy; 'auto' plans from the checkpoint and free memory")
    p.add_argument("--gpu-ids", default=None, help="GPUs to use, e.g. 0,1 (default: all)")
    p.add_argument("--device", default=None, help="device for a single-device run (default: cuda if present, else cpu)")
    p.add_argument("--output", default="output", help="folder for the preview and the latent")
    return p.parse_args()


def tiny_defaults(args):
    """Sizes that keep the tiny model quick on a CPU."""
    for name, tiny, real in (("width", 64, 832), ("height", 48, 480), ("frames", 9, 81), ("steps", 8, 30)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.model is None else real)


def load_text(args, text_dim, generator):
    if args.text_embeddings:
        from safetensors.torch import load_file
        tensors = load_file(args.text_embeddings)
        if "positive" not in tensors:
            sys.exit(f"{args.text_embeddings} has no 'positive' tensor (found: {', '.join(tensors)}).")
        positive = tensors["positive"].float().reshape(-1, tensors["positive"].shape[-1])
        negative = tensors.get("negative", torch.zeros_like(positive)).float().reshape(-1, positive.shape[-1])
        return positive, negative
    return torch.randn(24, text_dim, generator=generator), torch.randn(12, text_dim, generator=generator)


def main():
    args = parse_args()
    tiny_defaults(args)
    os.makedirs(args.output, exist_ok=True)
    print("GPUs:")
    api.print_gpu_status()

    path = args.model
    if path is None:
        path = os.path.join(args.output, "wan2.1_tiny_t2v.safetensors")
        api.make_tiny_checkpoint(path, "t2v", text_dim=4096, num_layers=6)
        print(f"\nBuilt-in tiny model written to {path}")
    info = api.inspect_checkpoint(path)
    print(f"Model: {info.summary()}")
    if info.model_type != "t2v":
        sys.exit("This example runs text-to-video; image-to-video runs through the ComfyUI workflow "
                 "example_workflows/wan_i2v_multi_gpu.json.")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    settings = api.LoadSettings(base_precision=precision, quantization=args.quantization,
                            block_swap=api.BlockSwapSettings(blocks_to_swap=args.blocks_to_swap)
                            if args.blocks_to_swap else None)
    started = time.perf_counter()
    pipeline = api.load(path, args.parallelism, args.gpu_ids, settings, device=device,
                        width=args.width, height=args.height, num_frames=args.frames)
    load_seconds = time.perf_counter() - started
    print(f"\nLoaded in {load_seconds:.1f} s:\n{pipeline.describe()}\n")

    generator = torch.Generator().manual_seed(args.seed)
    positive, negative = load_text(args, info.config["text_dim"], generator)
    shape = (1, 16, api.latent_frame_count(args.frames), args.height // 8, args.width // 8)
    noise = api.make_noise(shape, args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with api.monitor_memory_usage(interval=0.2) as usage:
        started = time.perf_counter()
        latents = pipeline.generate(noise, api.Conditioning([positive]), api.Conditioning([negative]), steps=args.steps,
                                    cfg=args.cfg, shift=args.shift, scheduler=args.scheduler)
        seconds = time.perf_counter() - started
    print(f"\nSampled {args.steps} steps of a {args.width}x{args.height}, {args.frames}-frame video "
          f"({shape[2] * shape[3] * shape[4] // 4} tokens) in {seconds:.2f} s "
          f"({seconds / args.steps:.3f} s per step, cfg {args.cfg:g})")
    print("  " + usage.summary().replace("\n", "\n  "))
    if device.type == "cuda":
        print(f"  peak allocated by this process on {device}: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if resource is not None:  # ru_maxrss is in KiB on Linux
        print(f"  peak CPU memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    latent_path = os.path.join(args.output, "latent.safetensors")
    from safetensors.torch import save_file
    save_file({"latent": api.denormalize_latents(latents.cpu()).contiguous()}, latent_path)
    preview = api.save_preview_animation(latents[0], os.path.join(args.output, "preview.gif"))
    print(f"Wrote {preview} (latent preview) and {latent_path} (raw VAE latent for ComfyUI's VAEDecode)")
    pipeline.unload()


if __name__ == "__main__":
    main()
