#!/usr/bin/env python3
"""Generate a Wan 2.1 video latent from Python, on one GPU, several, or the CPU.

With no arguments it runs anywhere, CPU-only machines included: it writes the built-in tiny Wan
model (random weights, real architecture) to the output folder, shows the GPUs it found, loads the
model ('auto', as the Multi-GPU loader node: planned from the checkpoint header and free memory),
samples a few steps with a progress bar, prints timings and peak memory, and writes a preview (an
animated image of the latent through Wan's latent-to-RGB factors) and a ComfyUI .latent file.

    python example_multi_gpu_usage.py                           # the built-in tiny model
    python example_multi_gpu_usage.py --model wan2.1_t2v_14B_bf16.safetensors --text-embeddings prompt.safetensors \\
        --width 832 --height 480 --frames 81 --steps 30 --gpu-ids 0,1

For a real video, --text-embeddings holds umT5-XXL embeddings of the prompts (README: "From the
example to a video"), and the .latent file opens in ComfyUI with LoadLatent -> VAEDecode.
Every error is one line on stderr and exit status 2; --debug shows the traceback.
"""
import argparse
import logging
import os
import sys
import time

import torch

try:
    import resource  # peak memory of this process; not on Windows
except ImportError:
    resource = None

from wanvideo import api
from wanvideo.cli import OneLineArgumentParser, number_at_least, run_reporting_errors


PROG = os.path.basename(__file__)
LATENT_NAME = "wan_video.latent"


def build_parser():
    # Sizes, steps, cfg and shift are checked after parsing, by the same checks the nodes use
    # (check_video_size, the sampling loop's check_inputs), so the rules live in one place.
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Wan 2.1 .safetensors file; default: the built-in tiny model")
    p.add_argument("--text-embeddings", help="safetensors file with 'positive' (and optionally 'negative') umT5-XXL "
                                             "embeddings [L, 4096] or [1, L, 4096]; default: random embeddings "
                                             "(for timing)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default 832; tiny model: 64)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default 480; tiny model: 48)")
    p.add_argument("--frames", type=int, default=None, help="video frames, 4n+1 (default 81; tiny model: 9)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, 1 or more (default 30; tiny model: 8)")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale, 1 or more; 1 skips the negative pass")
    p.add_argument("--shift", type=float, default=5.0, help="flow-matching timestep shift, above 0")
    p.add_argument("--scheduler", default="unipc", choices=list(api.SCHEDULERS), help="flow solver")
    p.add_argument("--seed", type=number_at_least(int, 0), default=42, help="noise seed")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="base precision (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quantization", default="disabled", choices=list(api.QUANTIZATION_MODES),
                   help="fp8 storage of the block weights")
    p.add_argument("--blocks-to-swap", type=number_at_least(int, 0), default=0, help="blocks kept in pinned CPU memory")
    p.add_argument("--parallelism", default=None, choices=list(api.PARALLELISM_CHOICES),
                   help="multi-GPU strategy (default 'auto', as the Multi-GPU loader node: planned from the "
                        "checkpoint and free memory, the CPU when there is no GPU; 'none' with --device)")
    p.add_argument("--gpu-ids", default=None,
                   help="GPUs to use, e.g. 0,1 (default: every GPU); each must exist; with --parallelism none, one id")
    p.add_argument("--device", default=None,
                   help="one device for a single-device run, e.g. cpu or cuda:1 (implies --parallelism none)")
    p.add_argument("--output", default="output", help="folder for the preview and the .latent file")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def tiny_defaults(args):
    """Sizes that keep the tiny model quick on a CPU."""
    for name, tiny, real in (("width", 64, 832), ("height", 48, 480), ("frames", 9, 81), ("steps", 8, 30)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.model is None else real)


def resolve_placement(args):
    """Where the run goes, refusing what would be ignored: -> (parallelism, gpu_ids, device or None).
    'auto' by default, as the node; --device (or --parallelism none) runs one device; --gpu-ids are
    checked against the GPUs here, so a missing id is an error, never silently dropped."""
    parallelism = args.parallelism or ("none" if args.device else "auto")
    if args.device is not None:
        if args.gpu_ids is not None:
            raise ValueError("give --device (one device) or --gpu-ids (GPUs for a strategy), not both.")
        if parallelism != "none":
            raise ValueError(f"--device runs one device (--parallelism none); --parallelism {parallelism} takes "
                             "--gpu-ids instead.")
        devices = api.check_devices_available(args.device)  # "Torch not compiled with CUDA" said in words, now
        if len(devices) != 1:
            raise ValueError(f"--device {args.device!r} names {len(devices)} devices; give one, or --gpu-ids for "
                             "several GPUs.")
        return parallelism, None, devices[0]
    if parallelism not in ("auto", "none") and not torch.cuda.device_count():
        raise ValueError(f"--parallelism {parallelism} needs CUDA GPUs, and this process sees none: use auto or none "
                         "to run on the CPU.")
    if args.gpu_ids is not None:
        ok, message = api.validate_gpu_setup(args.gpu_ids)
        if not ok:
            raise ValueError(f"--gpu-ids {args.gpu_ids}: {message}")
        ids = api.parse_gpu_ids(args.gpu_ids)
        if parallelism == "none":
            if len(ids) != 1:
                raise ValueError(f"--parallelism none runs one GPU, but --gpu-ids {args.gpu_ids} names {len(ids)}: "
                                 "give one id, or a multi-GPU strategy (auto, data_parallel, block_distribution, "
                                 "distributed).")
            return parallelism, None, torch.device("cuda", ids[0])
        return parallelism, ids, None
    if parallelism == "none":
        return parallelism, None, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parallelism, None, None


def check_output_folder(folder):
    """Create the output folder now, so a bad --output fails before the model is loaded."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output {folder!r} is a file: give a folder for the preview and the .latent file.")
    os.makedirs(folder, exist_ok=True)


def load_text(args, text_dim, generator):
    """(positive, negative) text embeddings [L, text_dim]: from --text-embeddings, else random."""
    if args.text_embeddings:
        from safetensors.torch import load_file
        tensors = load_file(args.text_embeddings)
        if "positive" not in tensors:
            raise ValueError(f"{args.text_embeddings} has no 'positive' tensor (found: {', '.join(tensors) or 'none'}); "
                             "save the prompt's umT5-XXL embeddings under 'positive' (README: \"From the example to "
                             "a video\").")
        positive = tensors["positive"].float().reshape(-1, tensors["positive"].shape[-1])
        negative = tensors.get("negative", torch.zeros_like(positive)).float().reshape(-1, positive.shape[-1])
        return positive, negative
    return torch.randn(24, text_dim, generator=generator), torch.randn(12, text_dim, generator=generator)


def run(args):
    parallelism, gpu_ids, device = resolve_placement(args)
    check_output_folder(args.output)
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
        raise ValueError("This example runs text-to-video; image-to-video runs through the ComfyUI workflow "
                         "example_workflows/wan_i2v_multi_gpu.json.")

    # Every sampling input is checked before the (possibly minutes-long) load, by the loop's own check.
    generator = torch.Generator().manual_seed(args.seed)
    positive, negative = load_text(args, info.config["text_dim"], generator)
    positive, negative = api.Conditioning([positive]), api.Conditioning([negative])
    shape = (1, api.LATENT_CHANNELS, api.latent_frame_count(args.frames), args.height // api.SPATIAL_COMPRESSION,
             args.width // api.SPATIAL_COMPRESSION)
    noise = api.make_noise(shape, args.seed)
    api.check_inputs(noise, positive, negative, args.cfg, patch_size=info.config["patch_size"], steps=args.steps,
                     shift=args.shift, scheduler=args.scheduler, text_dim=info.config["text_dim"])

    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    settings = api.LoadSettings(base_precision=precision, quantization=args.quantization,
                                block_swap=api.BlockSwapSettings(blocks_to_swap=args.blocks_to_swap)
                                if args.blocks_to_swap else None)
    started = time.perf_counter()
    pipeline = api.load(path, parallelism, gpu_ids, settings, device=device,
                        width=args.width, height=args.height, num_frames=args.frames)
    try:
        load_seconds = time.perf_counter() - started
        print(f"\nLoaded ({parallelism}) in {load_seconds:.1f} s:\n{pipeline.describe()}\n")
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        with api.monitor_memory_usage(interval=0.2) as usage:
            started = time.perf_counter()
            latents = pipeline.generate(noise, positive, negative, steps=args.steps, cfg=args.cfg, shift=args.shift,
                                        scheduler=args.scheduler)
            seconds = time.perf_counter() - started
    finally:
        pipeline.unload()
    print(f"\nSampled {args.steps} steps of a {args.width}x{args.height}, {args.frames}-frame video "
          f"({shape[2] * shape[3] * shape[4] // 4} tokens) in {seconds:.2f} s "
          f"({seconds / args.steps:.3f} s per step, cfg {args.cfg:g})")
    print("  " + usage.summary().replace("\n", "\n  "))
    for index in range(torch.cuda.device_count()):  # this process only; worker processes show in the summary
        if torch.cuda.max_memory_allocated(index):
            print(f"  peak allocated by this process on cuda:{index}: "
                  f"{torch.cuda.max_memory_allocated(index) / 2**30:.2f} GiB")
    if resource is not None:  # ru_maxrss is in KiB on Linux
        print(f"  peak CPU memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    latent_path = api.save_comfy_latent(os.path.join(args.output, LATENT_NAME), latents)
    preview = api.save_preview_animation(latents[0], os.path.join(args.output, "preview.gif"))
    print(f"Wrote {preview} (latent preview) and {latent_path} (ComfyUI LATENT: copy it into ComfyUI's input folder "
          "and decode it with LoadLatent -> VAEDecode)")
    return 0


def main(argv=None):
    """The example; returns the exit status (0 done, 2 an error, said in one line; 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tiny_defaults(args)
    try:  # as argparse refuses a bad value: --width 65 would otherwise silently become a 64-pixel latent
        api.check_video_size(args.width, args.height, args.frames)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    return run_reporting_errors(lambda: run(args), PROG, args.debug)


if __name__ == "__main__":
    sys.exit(main())
