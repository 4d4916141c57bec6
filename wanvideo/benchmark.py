"""Time parallel strategies on one checkpoint: the same seeded inputs and steps for each, side by side.

    rows = benchmark_multi_gpu_performance("wan.safetensors", configs=["single_device", "block_swap"])
    print(format_benchmark_table(rows))

A strategy is registered as build(model_path, devices, settings) -> BenchmarkRunnable; the built-in
ones load through the package's one load sequence (wanvideo.pipeline.load_prepared_model, or
wanvideo.parallel.load_parallel_pipeline for the multi-device strategies), so what is timed is what
the nodes run. Each configuration is timed per denoising forward after `warmup_steps` untimed ones,
and compared with the single_device row of the same run (speed-up and relative error).

This module sits above wanvideo.parallel (it times the strategies); it imports them lazily, so a
strategy whose module cannot be imported is reported as skipped rather than breaking the rest.
"""
import datetime
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch

from .checkpoint import inspect_checkpoint
from .devices import check_devices_available, parse_devices, release_memory
from .gpus.discovery import GIB
from .gpus.monitor import pyplot_free_figure
from .latent_format import check_video_size  # re-exported: the CLI and older callers import it from here

logger = logging.getLogger(__name__)

__all__ = ["BenchmarkSettings", "BenchmarkRunnable", "BenchmarkStrategy", "BENCHMARK_STRATEGIES",
           "register_benchmark_strategy", "benchmark_defaults", "check_video_size", "make_benchmark_inputs",
           "benchmark_multi_gpu_performance", "format_benchmark_table", "format_progress"]

# What a configuration runs when the caller gives no size or precision: a real 480p clip on GPUs; on
# CPUs a few latent tokens in fp32 (bf16 matmuls are slow on most CPUs), so a run takes seconds, not
# the minutes per step 832x480x81 takes there.
GPU_WORKLOAD = dict(width=832, height=480, num_frames=81, base_precision="bf16")
CPU_WORKLOAD = dict(width=64, height=48, num_frames=5, base_precision="fp32")


@dataclass
class BenchmarkSettings:
    """What every benchmarked configuration runs: the same inputs, the same number of steps.
    Sizes in pixels and frames; the inputs are latents [16, (num_frames - 1) // 4 + 1, height // 8, width // 8]."""
    width: int = 832
    height: int = 480
    num_frames: int = 81
    steps: int = 3
    warmup_steps: int = 1
    base_precision: str = "bf16"
    quantization: str = "disabled"
    cfg: bool = True
    batch_size: int = 1
    blocks_to_swap: Optional[int] = None   # block swap: None = half the blocks
    text_tokens: int = 64
    seed: int = 0
    attention_mode: str = "sdpa"

    def __post_init__(self):  # also runs for dataclasses.replace, so per-configuration overrides are checked
        check_video_size(self.width, self.height, self.num_frames)
        if self.steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"steps={self.steps}, warmup_steps={self.warmup_steps}: give at least one step and no "
                             "negative warm-up.")
        for name in ("batch_size", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid: give 1 or more.")
        if self.blocks_to_swap is not None and self.blocks_to_swap < 0:
            raise ValueError(f"blocks_to_swap={self.blocks_to_swap!r} is negative: give 0 or more, or None for half "
                             "the blocks.")


@dataclass
class BenchmarkRunnable:
    """A model placed by a strategy. run_step(inputs) runs one denoising forward on the dict of
    WanModel.forward arguments and returns its output; release() frees what it holds."""
    run_step: Callable
    devices: list
    release: Callable = lambda: None


@dataclass
class BenchmarkStrategy:
    build: Callable          # (model_path, devices: list[torch.device], settings) -> BenchmarkRunnable
    min_devices: int = 1
    description: str = ""


BENCHMARK_STRATEGIES = {}


def register_benchmark_strategy(name, build=None, *, min_devices=1, description=""):
    """Register build(model_path, devices, settings) -> BenchmarkRunnable under `name`; usable as a
    decorator. A build that raises ImportError (its module is not there yet) is reported as skipped."""
    def register(function):
        BENCHMARK_STRATEGIES[name] = BenchmarkStrategy(function, min_devices, description or (function.__doc__ or "")
                                                       .strip().split("\n")[0])
        return function
    return register(build) if build is not None else register


def _load_settings(settings, blocks_to_swap=0):
    from .engine import BlockSwapSettings
    from .pipeline import LoadSettings
    return LoadSettings(base_precision=settings.base_precision, quantization=settings.quantization,
                        attention_mode=settings.attention_mode,
                        block_swap=BlockSwapSettings(blocks_to_swap=blocks_to_swap) if blocks_to_swap else None)


def _prepared_model(model_path, device, load_settings):
    """A whole model computing on `device`, through the one load sequence."""
    from .pipeline import load_prepared_model
    model, _, swapper = load_prepared_model(model_path, device, load_settings)

    def release():
        if swapper is not None:
            swapper.remove(restore_device="cpu")  # frees pinned buffers and slots without uploading the blocks
        model.to("meta")  # drop the weights wherever they are
        release_memory()
    return BenchmarkRunnable(lambda inputs: model(**inputs), [device], release)


@register_benchmark_strategy("single_device")
def _single_device(model_path, devices, settings):
    """The whole model on the first device: the baseline."""
    return _prepared_model(model_path, devices[0], _load_settings(settings))


@register_benchmark_strategy("block_swap")
def _block_swap(model_path, devices, settings):
    """The model on the first device with blocks_to_swap blocks kept in CPU memory and streamed in."""
    blocks_to_swap = settings.blocks_to_swap
    if blocks_to_swap is None:
        blocks_to_swap = inspect_checkpoint(os.fspath(model_path)).num_layers // 2
    return _prepared_model(model_path, devices[0], _load_settings(settings, blocks_to_swap))


def _strategy_pipeline(name, model_path, devices, settings):
    from .parallel import load_parallel_pipeline
    pipeline = load_parallel_pipeline(model_path, name, devices=devices, settings=_load_settings(settings),
                                      width=settings.width, height=settings.height, num_frames=settings.num_frames)
    return BenchmarkRunnable(lambda inputs: pipeline.denoiser(**inputs), list(dict.fromkeys(devices)),
                             pipeline.unload)


@register_benchmark_strategy("data_parallel", min_devices=2)
def _data_parallel(model_path, devices, settings):
    """A replica on each device; the batch (cond and uncond) split across them."""
    return _strategy_pipeline("data_parallel", model_path, devices, settings)


@register_benchmark_strategy("block_distribution", min_devices=2)
def _block_distribution(model_path, devices, settings):
    """Contiguous block ranges on the devices, cond and uncond pipelined across them."""
    return _strategy_pipeline("block_distribution", model_path, devices, settings)


def make_benchmark_inputs(config, settings):
    """Seeded random inputs for WanModel.forward (CPU tensors) and one timestep per step.

    Returns (inputs without 't', timesteps [warmup_steps + steps]). With CFG the batch holds the
    cond items then the uncond items (same latents, different text)."""
    generator = torch.Generator().manual_seed(settings.seed)
    shape = ((settings.num_frames - 1) // 4 + 1, settings.height // 8, settings.width // 8)
    latents = [torch.randn(16, *shape, generator=generator) for _ in range(settings.batch_size)]
    texts = [torch.randn(settings.text_tokens, config["text_dim"], generator=generator)
             for _ in range(2 if settings.cfg else 1)]
    x = latents * len(texts)
    context = [text for text in texts for _ in range(settings.batch_size)]
    inputs = dict(x=x, context=context)
    if config["model_type"] != "t2v":
        image_tokens = 514 if config["model_type"] == "flf2v" else 257
        condition = [torch.randn(config["in_dim"] - 16, *shape, generator=generator) for _ in range(settings.batch_size)]
        clip = torch.randn(settings.batch_size, image_tokens, 1280, generator=generator)
        inputs.update(y=condition * len(texts), clip_fea=clip.repeat(len(texts), 1, 1))
    timesteps = torch.linspace(999.0, 1.0, settings.warmup_steps + settings.steps)
    return inputs, timesteps


def benchmark_defaults(devices):
    """Width, height, num_frames and base_precision a benchmark on `devices` uses when not given:
    GPU_WORKLOAD, or CPU_WORKLOAD when every device is a CPU."""
    devices = parse_devices(devices)
    return dict(CPU_WORKLOAD if all(d.type == "cpu" for d in devices) else GPU_WORKLOAD)


def _prepare_output_dir(output_dir):
    """Create the folder now, so a bad path fails before minutes of benchmarking, not after."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        problem = ("is a file" if os.path.exists(output_dir) else
                   f"cannot be created ({(error.strerror or str(error)).lower()})")
        raise ValueError(f"output_dir {os.fspath(output_dir)!r} {problem}: give a folder to write "
                         "benchmark_results.json and benchmark_chart.png in.") from error


def _synchronize(devices):
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _run_config(label, strategy_name, model_path, devices, settings, inputs, timesteps):
    strategy = BENCHMARK_STRATEGIES[strategy_name]
    row = dict(config=label, strategy=strategy_name, devices=[str(d) for d in devices[:strategy.min_devices]],
               status="ok", seconds_per_step=None, step_seconds=[], peak_memory_per_gpu={}, speedup_vs_single=None,
               relative_error_vs_single=None, note="")
    if len(devices) < strategy.min_devices:
        row.update(status="skipped", note=f"needs {strategy.min_devices} devices, {len(devices)} given")
        return row, None
    try:
        runnable = strategy.build(model_path, devices, settings)
    except ImportError as error:
        row.update(status="skipped", note=f"strategy module not available: {error}")
        return row, None
    except Exception as error:
        # The row carries the message; the traceback only when asked for (a CLI's --debug).
        logger.info("Benchmark configuration %r failed to build: %s", label, error,
                    exc_info=logger.isEnabledFor(logging.DEBUG))
        row.update(status="failed", note=f"{type(error).__name__}: {error}")
        return row, None
    row["devices"] = [str(d) for d in runnable.devices]
    output = None
    # Inputs wait on the first device, so the timed steps do not include their upload.
    inputs = {k: [v.to(runnable.devices[0]) for v in value] if isinstance(value, list) else value.to(runnable.devices[0])
              for k, value in inputs.items()}
    try:
        with torch.inference_mode():
            for step, t in enumerate(timesteps):
                if step == settings.warmup_steps:
                    for device in runnable.devices:
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                _synchronize(runnable.devices)
                start = time.perf_counter()
                output = runnable.run_step(dict(inputs, t=t.repeat(len(inputs["x"])).to(runnable.devices[0])))
                _synchronize(runnable.devices)
                if step >= settings.warmup_steps:
                    row["step_seconds"].append(time.perf_counter() - start)
        row["seconds_per_step"] = statistics.fmean(row["step_seconds"])
        row["peak_memory_per_gpu"] = {str(d): torch.cuda.max_memory_allocated(d)
                                      for d in runnable.devices if d.type == "cuda"}
        output = [o.detach().float().cpu() for o in output]
    except Exception as error:
        logger.info("Benchmark configuration %r failed while running: %s", label, error,
                    exc_info=logger.isEnabledFor(logging.DEBUG))
        row.update(status="failed", note=f"{type(error).__name__}: {error}")
        output = None
    finally:
        runnable.release()
    return row, output


def benchmark_multi_gpu_performance(model_path, configs=None, steps=3, width=None, height=None, num_frames=None,
                                    output_dir=None, devices=None, progress=None, **settings):
    """Run each configuration for `steps` denoising forwards on the same inputs -> list of rows.

    configs: names from BENCHMARK_STRATEGIES, or dicts {"strategy": name, "name": label, plus
    BenchmarkSettings fields to override, e.g. "blocks_to_swap": 10}; None: every registered
    strategy. devices: 'cpu', '0,1', [0, 1] or torch devices (None: all GPUs, else the CPU).
    width, height (pixels), num_frames and base_precision (in settings) left out or None: see
    benchmark_defaults (832x480, 81 frames, bf16 on GPUs; 64x48, 5 frames, fp32 on CPUs).
    settings: other BenchmarkSettings fields (warmup_steps, base_precision, quantization, cfg,
    batch_size, blocks_to_swap, text_tokens, seed, attention_mode).
    progress(index, total, row): called as each configuration starts (row["status"] == "running",
    with config, strategy and settings) and as it ends (the finished row); index counts from 1.
    Each row: config, strategy, devices, status ('ok', 'skipped', 'failed'), seconds_per_step,
    step_seconds, peak_memory_per_gpu (bytes, CUDA devices only), speedup_vs_single and
    relative_error_vs_single (against the single_device row of the same run), seconds (wall time
    of the configuration, load and release included), note, settings.
    output_dir: also write benchmark_results.json and benchmark_chart.png there.
    Arguments are all checked (ValueError naming the value) before any model is loaded.
    """
    devices = check_devices_available(devices)  # unusable CUDA devices fail before any loading
    defaults = benchmark_defaults(devices)
    given = dict(width=width, height=height, num_frames=num_frames, base_precision=settings.pop("base_precision", None))
    workload = {key: defaults[key] if value is None else value for key, value in given.items()}
    if any(value is None for value in given.values()) and defaults == CPU_WORKLOAD:
        logger.info("CPU devices: %dx%d pixels, %d frames, %s where not given.", CPU_WORKLOAD["width"],
                    CPU_WORKLOAD["height"], CPU_WORKLOAD["num_frames"], CPU_WORKLOAD["base_precision"])
    base = BenchmarkSettings(steps=steps, **workload, **settings)
    plans = []
    for entry in list(BENCHMARK_STRATEGIES) if configs is None else configs:
        entry = {"strategy": entry} if isinstance(entry, str) else dict(entry)
        strategy = entry.pop("strategy", None)
        if strategy not in BENCHMARK_STRATEGIES:
            raise ValueError(f"Unknown benchmark strategy {strategy!r}; registered: {', '.join(BENCHMARK_STRATEGIES)}.")
        label = entry.pop("name", strategy)
        plans.append((label, strategy, replace(base, **entry)))
    info = inspect_checkpoint(os.fspath(model_path))
    if output_dir is not None:
        _prepare_output_dir(output_dir)

    rows, reference = [], None
    for index, (label, strategy, config_settings) in enumerate(plans, 1):
        if progress is not None:
            progress(index, len(plans), dict(config=label, strategy=strategy, status="running",
                                             settings=asdict(config_settings)))
        started = time.perf_counter()
        inputs, timesteps = make_benchmark_inputs(info.config, config_settings)
        logger.info("Benchmarking %s on %s", label, ", ".join(map(str, devices)))
        row, output = _run_config(label, strategy, model_path, devices, config_settings, inputs, timesteps)
        row.update(seconds=time.perf_counter() - started, settings=asdict(config_settings))
        if progress is not None:
            progress(index, len(plans), row)
        if strategy == "single_device" and output is not None and reference is None:
            reference = (row, output)
        rows.append((row, output))
    for row, output in rows:
        if reference is not None and output is not None and row["seconds_per_step"]:
            reference_row, reference_output = reference
            row["speedup_vs_single"] = reference_row["seconds_per_step"] / row["seconds_per_step"]
            row["relative_error_vs_single"] = (
                torch.cat([(a - b).flatten() for a, b in zip(output, reference_output)]).norm()
                / torch.cat([b.flatten() for b in reference_output]).norm()).item()
    table = [row for row, _ in rows]
    if output_dir is not None:
        _save_benchmark(table, info, devices, output_dir)
    return table


def _save_benchmark(table, info, devices, output_dir):
    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  model=info.summary(), devices=[str(d) for d in devices],
                  device_names=[torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"],
                  torch=torch.__version__, results=table)
    with open(os.path.join(output_dir, "benchmark_results.json"), "w") as f:
        json.dump(record, f, indent=2)
    try:
        figure = pyplot_free_figure((9, 4))
    except ImportError:
        logger.warning("matplotlib is not installed, so no benchmark chart was written (pip install matplotlib).")
        return
    done = [row for row in table if row["status"] == "ok"]
    time_axes, memory_axes = figure.subplots(1, 2)
    labels = [row["config"] for row in done]
    time_axes.bar(labels, [row["seconds_per_step"] for row in done])
    time_axes.set_ylabel("seconds per step")
    memory_axes.bar(labels, [max(row["peak_memory_per_gpu"].values(), default=0) / GIB for row in done])
    memory_axes.set_ylabel("peak GPU memory (GiB, largest GPU)")
    for axes in (time_axes, memory_axes):
        axes.tick_params(axis="x", labelrotation=20)
    figure.suptitle(info.summary(), fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "benchmark_chart.png"), dpi=100)


def format_progress(index, total, row):
    """One line for a progress(index, total, row) call: the configuration starting, or how it ended."""
    head = f"[{index}/{total}] {row['config']}"
    if row["status"] == "running":
        s = row["settings"]
        return (f"{head}: running {s['warmup_steps']} warm-up + {s['steps']} timed steps, {s['width']}x{s['height']}, "
                f"{s['num_frames']} frames, {s['base_precision']}...")
    if row["status"] == "ok":
        return (f"{head}: ok on {', '.join(row['devices'])}, {row['seconds_per_step']:.3f} s/step "
                f"({row['seconds']:.1f} s with loading)")
    return f"{head}: {row['status']}: {row['note']}"


def format_benchmark_table(table):
    """The rows of benchmark_multi_gpu_performance as an aligned text table."""
    rows = [("config", "status", "s/step", "speed-up", "rel. error", "peak memory", "devices / note")]
    for r in table:
        memory = ", ".join(f"{d}: {b / GIB:.1f} GiB" for d, b in r["peak_memory_per_gpu"].items()) or "-"
        number = lambda value, fmt: "-" if value is None else fmt.format(value)
        rows.append((r["config"], r["status"], number(r["seconds_per_step"], "{:.3f}"),
                     number(r["speedup_vs_single"], "{:.2f}x"), number(r["relative_error_vs_single"], "{:.1e}"),
                     memory, r["note"] or ", ".join(r["devices"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
