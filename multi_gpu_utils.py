"""GPUs for Wan 2.1 and 2.2: discovery, validation, monitoring, automatic configuration and benchmarks.

    from multi_gpu_utils import setup_optimal_parallelism, print_gpu_status, validate_gpu_setup
    config = setup_optimal_parallelism("model.safetensors")   # plan dict for the loader, with a reason
    config = get_optimal_gpu_config("high_noise.safetensors", low_noise_model="low_noise.safetensors")  # A14B pair
    print_gpu_status()                                         # one line per GPU, with its links
    is_valid, message = validate_gpu_setup([0, 1])             # or "0,1"
    is_valid, message = validate_model_setup("0,1", "model.safetensors")   # and the model's plan fits them

The documented names, kept here for scripts; each lives in the package (wanvideo/gpus/ for
discovery, validation and the memory monitor; wanvideo/parallel/auto.py for the plan;
wanvideo/benchmark.py for the benchmark). Everything runs on a machine without GPUs.
Command line: python multi_gpu_utils.py {status,validate,recommend,benchmark} --help
Every error ends the command with one line on stderr and exit status 2 (--debug: the traceback).
"""
import argparse
import json
import logging
import sys

from wanvideo.benchmark import (BENCHMARK_STRATEGIES, CPU_WORKLOAD, GPU_WORKLOAD, BenchmarkRunnable, BenchmarkSettings,
                                benchmark_defaults, benchmark_multi_gpu_performance, check_video_size,
                                format_benchmark_table, format_progress, register_benchmark_strategy)
from wanvideo.checkpoint import inspect_checkpoint
from wanvideo.cli import OneLineArgumentParser, number_at_least, run_reporting_errors
from wanvideo.devices import parse_devices, parse_gpu_ids
from wanvideo.gpus import (GIB, MemoryUsageReport, format_gpu_status, get_available_gpus, get_gpu_info,
                           monitor_memory_usage, print_gpu_status, validate_gpu_setup)
from wanvideo.parallel.auto import get_optimal_gpu_config, setup_optimal_parallelism, validate_model_setup

__all__ = [
    "get_gpu_info", "get_available_gpus", "format_gpu_status", "print_gpu_status", "parse_gpu_ids",
    "validate_gpu_setup", "validate_model_setup", "monitor_memory_usage", "MemoryUsageReport",
    "get_optimal_gpu_config", "setup_optimal_parallelism", "benchmark_multi_gpu_performance",
    "register_benchmark_strategy",
    "BENCHMARK_STRATEGIES", "BenchmarkSettings", "BenchmarkRunnable", "main",
]
PROG = "multi_gpu_utils.py"


def _add_workload_arguments(parser, by_device, wan22=True):
    """Size and precision options. by_device: None when not given, then chosen for the devices
    (benchmark_defaults); else the GPU workload's values. wan22: the model may be the TI2V-5B,
    whose sizes are multiples of 32 (its VAE compresses 16x). -> the options added, as (flag, dest) pairs."""
    def default(key):
        if by_device:
            return None, f"default {GPU_WORKLOAD[key]} on GPUs, {CPU_WORKLOAD[key]} on CPUs"
        return GPU_WORKLOAD[key], f"default {GPU_WORKLOAD[key]}"
    multiple = "a multiple of 16 (of 32 for the Wan 2.2 TI2V-5B)" if wan22 else "a multiple of 16"
    added = []  # the actions, read back for the (flag, dest) pairs so no list of them can drift

    def add(flag, **kwargs):
        added.append(parser.add_argument(flag, **kwargs))
    for flag, key, text in (("--width", "width", f"video width in pixels, {multiple}"),
                            ("--height", "height", f"video height in pixels, {multiple}"),
                            ("--frames", "num_frames", "number of frames, 4n + 1")):
        value, note = default(key)
        add(flag, type=number_at_least(int, 1), default=value, help=f"{text} ({note})")
    value, note = default("base_precision")
    add("--precision", choices=("bf16", "fp16", "fp32"), default=value, help=f"base precision ({note})")
    add("--quantization", default="disabled", choices=("disabled", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_fast"),
        help="fp8 storage of the block weights")
    add("--batch-size", type=number_at_least(int, 1), default=1, help="videos per step (default 1)")
    add("--no-cfg", action="store_true", help="guidance scale 1: no uncond branch")
    return [(action.option_strings[0], action.dest) for action in added]


def _build_parser():
    # Accepted before and after the command; SUPPRESS: a subparser's default must not hide a flag given before it.
    common = OneLineArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress (INFO)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = OneLineArgumentParser(prog=PROG, parents=[common], description="GPUs for Wan 2.1 and 2.2: status, "
                                   "validation, recommended parallelism, benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kwargs: commands.add_parser(name, parents=[common], **kwargs)
    status = add("status", help="table of the GPUs", description="Print the GPUs this process sees.")
    status.add_argument("--json", action="store_true", help="print the inventory as JSON")
    validate = add("validate", help="check GPU ids", description="Check that GPU ids can be used.")
    validate.add_argument("gpu_ids", help='GPU ids, e.g. "0,1"')
    validate.add_argument("--min-free-gib", type=number_at_least(float, 0),
                          help="each GPU needs at least this much free memory")
    validate.add_argument("--max-utilization", type=float, help="no GPU may be busier (percent)")
    validate.add_argument("--model", help="also check that the plan for this Wan 2.1 / 2.2 .safetensors file fits "
                                          "these GPUs")
    validate.add_argument("--low-noise-model", help="with --model (the high-noise expert): the Wan 2.2 A14B "
                                                    "low-noise expert; the pair is checked")
    workload = _add_workload_arguments(validate, by_device=False)
    # None: not given (they need --model); _validate fills in the defaults kept here as (flag, dest, default)
    validate.set_defaults(workload=[(flag, dest, validate.get_default(dest)) for flag, dest in workload],
                          **{dest: None for _, dest in workload})
    recommend = add("recommend", help="plan the parallelism for a model",
                    description="Read a checkpoint header and print the best plan for these GPUs.")
    recommend.add_argument("model", help="path of a Wan 2.1 / 2.2 .safetensors file (the high-noise expert of an "
                                         "A14B pair)")
    recommend.add_argument("--low-noise-model", help="the Wan 2.2 A14B low-noise expert: plan the pair")
    _add_workload_arguments(recommend, by_device=False)
    recommend.add_argument("--json", action="store_true", help="print the plan as JSON")
    bench = add("benchmark", help="time configurations on a model",
                description="Run a few denoising forwards per configuration on the same inputs.")
    bench.add_argument("model", help="path of a Wan 2.1 .safetensors file")
    _add_workload_arguments(bench, by_device=True, wan22=False)
    bench.add_argument("--configs", help=f"comma-separated strategies (default: all; "
                                         f"registered: {', '.join(BENCHMARK_STRATEGIES)})")
    bench.add_argument("--steps", type=number_at_least(int, 1), default=3, help="timed steps per configuration (default 3)")
    bench.add_argument("--warmup-steps", type=number_at_least(int, 0), default=1, help="untimed steps first (default 1)")
    bench.add_argument("--blocks-to-swap", type=number_at_least(int, 0),
                       help="blocks kept in CPU memory for block_swap (default half)")
    bench.add_argument("--devices", help='"cpu", or GPU ids such as "0,1" (default: every GPU, else the CPU)')
    bench.add_argument("--output-dir", help="write benchmark_results.json and benchmark_chart.png here")
    return parser


def _status(args):
    gpus = get_gpu_info()
    print(json.dumps(gpus, indent=2) if args.json else format_gpu_status(gpus))
    return 0


def _workload(args, info):
    """The plan's workload arguments, the size checked by the sampler's rule for this checkpoint's
    VAE (info: its CheckpointInfo; multiples of 16, of 32 for the TI2V-5B's Wan 2.2 VAE)."""
    check_video_size(args.width, args.height, args.frames, info.latent_format)
    return dict(width=args.width, height=args.height, num_frames=args.frames, base_precision=args.precision,
                quantization=args.quantization, cfg=not args.no_cfg, batch_size=args.batch_size)


def _validate(args):
    if args.low_noise_model and not args.model:
        raise ValueError("--low-noise-model needs --model (the high-noise expert of the same A14B pair).")
    given = [flag for flag, dest, _ in args.workload if getattr(args, dest) is not None]
    if given and not args.model:
        one = len(given) == 1
        raise ValueError(f"{', '.join(given)} {'describes' if one else 'describe'} the video the model's plan is "
                         f"checked for and {'needs' if one else 'need'} --model: add --model MODEL.safetensors, or "
                         f"leave {'it' if one else 'them'} out to check the GPUs alone.")
    for _, dest, default in args.workload:
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    ok, message = validate_gpu_setup(args.gpu_ids, None if args.min_free_gib is None else args.min_free_gib * GIB,
                                     args.max_utilization)
    if ok and args.model:
        info = inspect_checkpoint(args.model)
        ok, message = validate_model_setup(args.gpu_ids, info, args.low_noise_model, **_workload(args, info))
    print(("OK: " if ok else "Not usable: ") + message)
    return 0 if ok else 1


def _print_plan(config, indent=""):
    for key, value in config.items():
        if key not in ("reason", "estimated_memory_per_gpu", "experts"):
            print(f"{indent}{key:24} {value}")
    memory = [f"{b / GIB:.1f} GiB" for b in config["estimated_memory_per_gpu"]]
    print(f"{indent}{'estimated_memory_per_gpu':24} {memory}")


def _recommend(args):
    info = inspect_checkpoint(args.model)
    config = get_optimal_gpu_config(info, low_noise_model=args.low_noise_model, **_workload(args, info))
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    _print_plan(config)
    for name, expert in config.get("experts", {}).items():
        print(f"\n{name.replace('_', '-')} expert:")
        _print_plan(expert, indent="  ")
    print(f"\n{config['reason']}")
    return 0


def _benchmark(args):
    devices = parse_devices(args.devices)
    given = dict(width=args.width, height=args.height, num_frames=args.frames, base_precision=args.precision)
    defaults = benchmark_defaults(devices)
    cpu_note = None in given.values() and all(d.type == "cpu" for d in devices)

    def progress(index, total, row):
        if cpu_note and index == 1 and row["status"] == "running":  # said once every argument has been checked
            print(f"CPU only: a small workload where not given ({defaults['width']}x{defaults['height']}, "
                  f"{defaults['num_frames']} frames, {defaults['base_precision']}); --width, --height, --frames and "
                  "--precision change it.")
        print(format_progress(index, total, row), flush=True)
    table = benchmark_multi_gpu_performance(
        args.model, configs=[c.strip() for c in args.configs.split(",")] if args.configs else None, steps=args.steps,
        output_dir=args.output_dir, devices=devices, quantization=args.quantization, cfg=not args.no_cfg,
        batch_size=args.batch_size, warmup_steps=args.warmup_steps, blocks_to_swap=args.blocks_to_swap,
        progress=progress, **given)
    print(format_benchmark_table(table))
    return 0 if all(row["status"] != "failed" for row in table) else 1


def main(argv=None):
    """The command line; returns the exit status (0 done, 1 a GPU or configuration not usable, 2 an error)."""
    args = _build_parser().parse_args(argv)
    debug, verbose = getattr(args, "debug", False), getattr(args, "verbose", False)  # absent unless given
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    command = dict(status=_status, validate=_validate, recommend=_recommend, benchmark=_benchmark)[args.command]
    return run_reporting_errors(lambda: command(args), f"{PROG} {args.command}", debug)


if __name__ == "__main__":
    sys.exit(main())
