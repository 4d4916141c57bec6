#!/usr/bin/env python3
"""Generate a Wan 2.1 or 2.2 video latent from Python, on one GPU, several, or the CPU.

With no arguments it runs anywhere, CPU-only machines included: it writes the built-in tiny Wan
model (random weights, real architecture) to the output folder, shows the GPUs it found, loads the
model ('auto', as the Multi-GPU loader node: planned from the checkpoint header and free memory),
samples a few steps with a progress bar, prints timings and peak memory, and writes a preview (an
animated image of the latent through Wan's latent-to-RGB factors) and a ComfyUI .latent file.
--tiny picks a Wan 2.2-shaped tiny model instead: a TI2V-5B-like one (48 latent channels, the Wan 2.2
VAE's space) or a T2V-A14B-like high-/low-noise expert pair (the sampler switches at the boundary).

    python example_multi_gpu_usage.py                           # the built-in tiny Wan 2.1 model
    python example_multi_gpu_usage.py --tiny wan2.2-ti2v-5b     # tiny TI2V-5B shape
    python example_multi_gpu_usage.py --tiny wan2.2-t2v-a14b    # tiny A14B expert pair
    python example_multi_gpu_usage.py --model wan2.1_t2v_14B_bf16.safetensors --text-embeddings prompt.safetensors \\
        --width 832 --height 480 --frames 81 --steps 30 --gpu-ids 0,1
    python example_multi_gpu_usage.py --model wan2.2_t2v_high_noise_14B_fp16.safetensors \\
        --low-noise-model wan2.2_t2v_low_noise_14B_fp16.safetensors --text-embeddings prompt.safetensors --steps 40

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
# --tiny: the built-in tiny models (wanvideo.tiny), each with the latent format it works in.
TINY_MODELS = {
    "wan2.1-t2v": "a Wan 2.1 text-to-video model (16 latent channels)",
    "wan2.2-ti2v-5b": "shaped like Wan 2.2 TI2V-5B (48 latent channels, the Wan 2.2 VAE's 16x compression)",
    "wan2.2-t2v-a14b": "shaped like Wan 2.2 T2V-A14B: a high-noise and a low-noise expert, switched at the boundary",
}
TINY_FORMATS = {"wan2.1-t2v": api.WAN21, "wan2.2-ti2v-5b": api.latent_format_for("Wan22"), "wan2.2-t2v-a14b": api.WAN21}
# Wan 2.2 T2V-A14B's official sampling (wan/configs/wan_t2v_A14B.py): shift 12, guide scales 4.0 high / 3.0 low;
# every other model here: shift 5, cfg 5.
A14B_T2V_GUIDANCE = dict(shift=12.0, cfg=4.0, cfg_low_noise=3.0)
DEFAULT_GUIDANCE = dict(shift=5.0, cfg=5.0)
VAE_FILES = {"Wan21": "wan_2.1_vae.safetensors", "Wan22": "wan2.2_vae.safetensors"}


def build_parser():
    # Sizes, steps, cfg and shift are checked after parsing, by the same checks the nodes use
    # (check_video_size, the sampling loop's check_inputs), so the rules live in one place.
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Wan 2.1 or 2.2 .safetensors file (with --low-noise-model: the A14B high-noise "
                                   "expert); default: the built-in tiny model picked by --tiny")
    p.add_argument("--tiny", choices=list(TINY_MODELS), default=None,
                   help="which built-in tiny model runs when --model is not given (default wan2.1-t2v): "
                        + "; ".join(f"{name}: {what}" for name, what in TINY_MODELS.items()))
    p.add_argument("--low-noise-model", help="a Wan 2.2 A14B pair: the low-noise expert file; --model is then the "
                                             "high-noise one")
    p.add_argument("--text-embeddings", help="safetensors file with 'positive' (and optionally 'negative') umT5-XXL "
                                             "embeddings [L, 4096] or [1, L, 4096]; default: random embeddings "
                                             "(for timing)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, multiple of 16, of 32 for TI2V-5B (default 832; tiny models: 64, the 5B's 96)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, multiple of 16, of 32 for TI2V-5B (default 480; tiny models: 48, the 5B's 64)")
    p.add_argument("--frames", type=int, default=None, help="video frames, 4n+1 (default 81; tiny model: 9)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, 1 or more (default 30; tiny model: 8)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale, 1 or more; 1 skips the negative pass (default 5; A14B pairs: 4, the "
                        "high-noise expert's)")
    p.add_argument("--shift", type=float, default=None,
                   help="flow-matching timestep shift, above 0 (default 5; A14B t2v pairs: 12)")
    p.add_argument("--boundary", type=float, default=None,
                   help="A14B pairs: the high-noise expert runs while the timestep is at least boundary x 1000, "
                        "in (0, 1) (default: the official 0.875 t2v, 0.900 i2v)")
    p.add_argument("--cfg-low-noise", type=float, default=None,
                   help="A14B pairs: the low-noise expert's guidance scale, 1 or more (default 3 for t2v pairs)")
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


def check_model_choice(args):
    """Refuse what would be ignored: --tiny with --model, a low-noise file without its high-noise one,
    and the pair-only settings without a pair."""
    if args.model is not None and args.tiny is not None:
        raise ValueError("give --model (your checkpoint) or --tiny (a built-in tiny model), not both.")
    if args.low_noise_model is not None and args.model is None:
        raise ValueError("--low-noise-model needs --model, the high-noise expert of the same pair.")
    pair = args.low_noise_model is not None or (args.model is None and args.tiny == "wan2.2-t2v-a14b")
    if not pair:
        given = [flag for flag, value in (("--boundary", args.boundary), ("--cfg-low-noise", args.cfg_low_noise))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to a Wan 2.2 A14B "
                             "expert pair (--low-noise-model, or --tiny wan2.2-t2v-a14b); this run has one model.")
    if args.boundary is not None and not 0 < args.boundary < 1:
        raise ValueError(f"--boundary {args.boundary:g} is not in (0, 1): Wan 2.2 uses 0.875 (t2v) and 0.9 (i2v).")
    return pair


def tiny_defaults(args, pair):
    """Sizes that keep the tiny model quick on a CPU; the guidance of the model's official config."""
    tiny_model = args.model is None
    if tiny_model and args.tiny is None:
        args.tiny = "wan2.1-t2v"
    wide = tiny_model and TINY_FORMATS[args.tiny].size_multiple > 16  # the 5B's 32-pixel grid
    for name, tiny, real in (("width", 96 if wide else 64, 832), ("height", 64 if wide else 48, 480),
                             ("frames", 9, 81), ("steps", 8, 30)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if tiny_model else real)
    for name, value in (A14B_T2V_GUIDANCE if pair else DEFAULT_GUIDANCE).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


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


def write_tiny_model(name, folder):
    """The built-in tiny model `name` (TINY_MODELS) in `folder` -> (path, low-noise path or None)."""
    if name == "wan2.2-t2v-a14b":
        pair = api.make_tiny_expert_pair(folder, "t2v", text_dim=4096, num_layers=6)
        return pair["high_noise"][0], pair["low_noise"][0]
    model_type, file_name = {"wan2.1-t2v": ("t2v", "wan2.1_tiny_t2v.safetensors"),
                             "wan2.2-ti2v-5b": ("ti2v", "wan2.2_tiny_ti2v_5B.safetensors")}[name]
    path = os.path.join(folder, file_name)
    api.make_tiny_checkpoint(path, model_type, text_dim=4096, num_layers=6)
    return path, None


def run(args):
    parallelism, gpu_ids, device = resolve_placement(args)
    check_output_folder(args.output)
    print("GPUs:")
    api.print_gpu_status()

    path, low_noise_path = args.model, args.low_noise_model
    if path is None:
        path, low_noise_path = write_tiny_model(args.tiny, args.output)
        print(f"\nBuilt-in tiny model ({args.tiny}: {TINY_MODELS[args.tiny]}) written to {path}"
              + (f" and {low_noise_path}" if low_noise_path else ""))
    info = api.inspect_checkpoint(path)
    print(f"Model: {info.summary()}")
    if low_noise_path is not None:
        print(f"Low-noise expert: {api.inspect_checkpoint(low_noise_path).summary()}")
    if info.model_type not in ("t2v", "ti2v"):  # TI2V-5B generates from text alone when no image is given
        raise ValueError("This example runs text-to-video; image-to-video runs through the ComfyUI workflows "
                         "example_workflows/wan_i2v_multi_gpu.json (Wan 2.1), wan22_ti2v_5B_i2v.json and "
                         "wan22_a14b_i2v.json (Wan 2.2).")
    fmt = info.latent_format  # Wan21 (16 channels, 8x) or Wan22 (48 channels, 16x: TI2V-5B)
    api.check_video_size(args.width, args.height, args.frames, fmt)

    # Every sampling input is checked before the (possibly minutes-long) load, by the loop's own check.
    generator = torch.Generator().manual_seed(args.seed)
    positive, negative = load_text(args, info.config["text_dim"], generator)
    positive, negative = api.Conditioning([positive]), api.Conditioning([negative])
    shape = (1,) + fmt.latent_shape(args.frames, args.height, args.width)
    noise = api.make_noise(shape, args.seed)
    api.check_inputs(noise, positive, negative, args.cfg, patch_size=info.config["patch_size"], steps=args.steps,
                     shift=args.shift, scheduler=args.scheduler, text_dim=info.config["text_dim"])
    if args.cfg_low_noise is not None:  # the same rule as cfg, said for the flag
        try:
            api.check_inputs(noise, positive, negative, args.cfg_low_noise, patch_size=info.config["patch_size"])
        except ValueError as error:
            raise ValueError(f"--cfg-low-noise: {error}") from None
    pair_inputs = {} if low_noise_path is None else dict(low_noise_path=low_noise_path, boundary=args.boundary)

    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    settings = api.LoadSettings(base_precision=precision, quantization=args.quantization,
                                block_swap=api.BlockSwapSettings(blocks_to_swap=args.blocks_to_swap)
                                if args.blocks_to_swap else None)
    started = time.perf_counter()
    pipeline = api.load(path, parallelism, gpu_ids, settings, device=device,
                        width=args.width, height=args.height, num_frames=args.frames, **pair_inputs)
    expert_inputs = {}
    try:
        load_seconds = time.perf_counter() - started
        print(f"\nLoaded ({parallelism}) in {load_seconds:.1f} s:\n{pipeline.describe()}\n")
        if low_noise_path is not None:  # which expert runs which step, from the schedule and the boundary
            expert_inputs = dict(cfg_low_noise=args.cfg_low_noise)
            schedule = pipeline.expert_pair().describe_schedule(api.flow_sigmas(args.steps, args.shift))
            print(f"Experts: {schedule}; cfg {args.cfg:g} high-noise, {args.cfg_low_noise or args.cfg:g} low-noise\n")
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        with api.monitor_memory_usage(interval=0.2) as usage:
            started = time.perf_counter()
            latents = pipeline.generate(noise, positive, negative, steps=args.steps, cfg=args.cfg, shift=args.shift,
                                        scheduler=args.scheduler, **expert_inputs)
            seconds = time.perf_counter() - started
    finally:
        pipeline.unload()
    print(f"\nSampled {args.steps} steps of a {args.width}x{args.height}, {args.frames}-frame video "
          f"({fmt.name} latent {list(shape)}, {shape[2] * shape[3] * shape[4] // 4} tokens) in {seconds:.2f} s "
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
          f"and decode it with LoadLatent -> VAEDecode, VAELoader {VAE_FILES[fmt.name]})")
    return 0


def main(argv=None):
    """The example; returns the exit status (0 done, 2 an error, said in one line; 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # as argparse refuses a bad value: --width 65 would otherwise silently become a 64-pixel latent
        tiny_defaults(args, check_model_choice(args))
        if args.model is None:  # a checkpoint's own format (16x for TI2V-5B) is checked once its header is read
            api.check_video_size(args.width, args.height, args.frames, TINY_FORMATS[args.tiny])
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    return run_reporting_errors(lambda: run(args), PROG, args.debug)


if __name__ == "__main__":
    sys.exit(main())
