"""GPU memory and utilisation sampled on a background thread while work runs, with a chart.

Readings come from NVML (memory used on the whole GPU, by every process) or, without it, from
torch.cuda.memory_allocated (this process' tensors only); the report says which.
"""
import contextlib
import functools
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..devices import parse_gpu_ids
from .discovery import GIB, _load_nvml, _optional, get_gpu_info

logger = logging.getLogger(__name__)

__all__ = ["MemorySample", "MemoryUsageReport", "MemoryMonitor", "monitor_memory_usage", "pyplot_free_figure"]


@dataclass
class MemorySample:
    time: float          # seconds since the monitor started
    used_bytes: dict     # torch index -> bytes in use
    utilization: dict    # torch index -> percent, or None where unknown


@dataclass
class MemoryUsageReport:
    """What monitor_memory_usage saw. source: 'nvml' (memory used on the whole GPU, all processes),
    'torch' (this process' tensors, torch.cuda.memory_allocated), 'custom' (an injected sampler) or
    'none' (no GPU). Per device (torch index): peak / mean bytes and utilisation (percent)."""
    devices: list = field(default_factory=list)
    source: str = "none"
    samples: list = field(default_factory=list)
    duration: float = 0.0   # seconds
    peak_bytes: dict = field(default_factory=dict)
    mean_bytes: dict = field(default_factory=dict)
    peak_utilization: dict = field(default_factory=dict)
    mean_utilization: dict = field(default_factory=dict)
    chart_path: Optional[str] = None

    @property
    def timeline(self):
        """{device: [(seconds, used bytes, utilisation or None), ...]}"""
        return {d: [(s.time, s.used_bytes[d], s.utilization.get(d)) for s in self.samples if d in s.used_bytes]
                for d in self.devices}

    def _finish(self):
        for device, points in self.timeline.items():
            used = [u for _, u, _ in points]
            busy = [b for _, _, b in points if b is not None]
            if used:
                self.peak_bytes[device], self.mean_bytes[device] = max(used), statistics.fmean(used)
            if busy:
                self.peak_utilization[device], self.mean_utilization[device] = max(busy), statistics.fmean(busy)

    def summary(self):
        if not self.devices:
            return "No GPU was monitored."
        lines = [f"{len(self.samples)} samples over {self.duration:.2f} s ({self.source}):"]
        for d in self.devices:
            if d not in self.peak_bytes:
                lines.append(f"  GPU {d}: no sample")
                continue
            util = (f", utilisation peak {self.peak_utilization[d]:.0f}% mean {self.mean_utilization[d]:.0f}%"
                    if d in self.peak_utilization else "")
            lines.append(f"  GPU {d}: peak {self.peak_bytes[d] / GIB:.2f} GiB, mean {self.mean_bytes[d] / GIB:.2f} GiB"
                         + util)
        return "\n".join(lines)

    def to_dict(self):
        return dict(devices=self.devices, source=self.source, duration=self.duration,
                    peak_bytes=self.peak_bytes, mean_bytes=self.mean_bytes, peak_utilization=self.peak_utilization,
                    mean_utilization=self.mean_utilization, chart_path=self.chart_path,
                    timeline={d: points for d, points in self.timeline.items()})


def _default_sampler(devices):
    """(sample function, source, devices, close function) for this machine.

    sample() -> {torch index: (used bytes, utilisation percent or None)}."""
    nvml = _load_nvml()
    if nvml is not None:
        try:
            nvml.nvmlInit()
        except Exception as error:
            logger.info("NVML is not usable here (%s); monitoring through torch.cuda.", error)
        else:
            try:
                gpus = get_gpu_info(nvml)
                chosen = _pick_devices(gpus, devices)
                handles = {g["index"]: nvml.nvmlDeviceGetHandleByIndex(g["nvml_index"]) for g in chosen
                           if g["source"] == "nvml"}
            except BaseException:
                nvml.nvmlShutdown()
                raise
            if len(handles) < len(chosen):  # NVML failed mid-way and the inventory came from torch
                nvml.nvmlShutdown()
                nvml = None

            def sample():
                readings = {}
                for index, handle in handles.items():
                    rates = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
                    readings[index] = (int(nvml.nvmlDeviceGetMemoryInfo(handle).used),
                                       None if rates is None else int(rates.gpu))
                return readings
            if nvml is not None:
                return sample, "nvml", list(handles), nvml.nvmlShutdown
    if torch.cuda.is_available():
        chosen = _pick_devices([dict(index=i) for i in range(torch.cuda.device_count())], devices)
        indices = [g["index"] for g in chosen]
        return (lambda: {i: (torch.cuda.memory_allocated(i), None) for i in indices}), "torch", indices, None
    logger.info("No CUDA GPU to monitor; the memory report will be empty.")
    return (lambda: {}), "none", [], None


def _pick_devices(gpus, devices):
    if devices is None:
        return gpus
    wanted = parse_gpu_ids(devices)
    missing = [d for d in wanted if d not in {g["index"] for g in gpus}]
    if missing and gpus:
        raise ValueError(f"Cannot monitor GPU {missing}: this process sees GPUs "
                         f"{[g['index'] for g in gpus]}. Pass devices from that list, or None for all.")
    return [g for g in gpus if g["index"] in wanted]


class MemoryMonitor:
    """Context manager and decorator behind monitor_memory_usage (see there)."""

    def __init__(self, interval=0.1, devices=None, chart_path=None, sampler=None):
        if not interval > 0:
            raise ValueError(f"interval={interval!r}: give the seconds between samples, a number above 0.")
        self.interval, self.devices, self.chart_path, self.sampler = interval, devices, chart_path, sampler
        self._thread = None

    def __enter__(self):
        if self._thread is not None:
            raise RuntimeError("This memory monitor is already running; use a new monitor_memory_usage() for a "
                               "nested or concurrent measurement.")
        if self.sampler is not None:
            self._sample, source, self._close = self.sampler, "custom", None
            devices = None if self.devices is None else parse_gpu_ids(self.devices)
        else:
            self._sample, source, devices, self._close = _default_sampler(self.devices)
        self.report = MemoryUsageReport(devices=list(devices or []), source=source)
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._take_sample()  # one sample now and one at the end, so even a short block has two
        if self.sampler is not None and self.devices is None and self.report.samples:
            self.report.devices = sorted(self.report.samples[0].used_bytes)
        self._thread = threading.Thread(target=self._run, name="gpu-memory-monitor", daemon=True)
        self._thread.start()
        return self.report

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._take_sample()
        if self._close is not None:
            with contextlib.suppress(Exception):
                self._close()
        report = self.report
        report.duration = time.perf_counter() - self._start
        report._finish()
        if self.chart_path is not None:
            report.chart_path = _save_memory_chart(report, self.chart_path)
        return False

    def _run(self):
        while not self._stop.wait(self.interval):
            self._take_sample()

    def _take_sample(self):
        if self._sample is None:
            return
        try:
            readings = self._sample()
        except Exception as error:  # a sampler that breaks mid-run stops sampling, not the user's work
            logger.warning("GPU memory sampling stopped: %s", error)
            self._sample = None
            return
        self.report.samples.append(MemorySample(
            time.perf_counter() - self._start, {d: int(u) for d, (u, _) in readings.items()},
            {d: b for d, (_, b) in readings.items()}))

    def __call__(self, func):
        """Decorator: every call is measured; the last report is `wrapper.last_report`."""
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            monitor = MemoryMonitor(self.interval, self.devices, self.chart_path, self.sampler)
            with monitor as report:
                wrapper.last_report = report
                return func(*args, **kwargs)
        wrapper.last_report = None
        return wrapper


def monitor_memory_usage(interval=0.1, devices=None, chart_path=None, sampler=None):
    """Sample each GPU's memory and utilisation every `interval` seconds on a background thread.

        with monitor_memory_usage(chart_path="memory.png") as report:
            run_generation()
        print(report.summary(), report.peak_bytes)

        @monitor_memory_usage(interval=0.5)        # or bare: @monitor_memory_usage
        def generate(): ...
        generate(); generate.last_report.peak_bytes

    devices: torch indices (list or "0,1"), None for all. Readings come from NVML (whole GPU) or,
    without it, torch.cuda.memory_allocated (this process). chart_path: write a PNG (matplotlib).
    sampler: a function () -> {device: (used bytes, utilisation % or None)} replacing the readings
    (tests). Without GPUs the report is empty.
    """
    if callable(interval):  # bare decorator
        return MemoryMonitor()(interval)
    return MemoryMonitor(interval, devices, chart_path, sampler)


def pyplot_free_figure(figsize):
    """A matplotlib Figure of `figsize` (inches) drawn by the Agg backend, without pyplot, so the
    host's global backend is never switched. ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def _save_memory_chart(report, path):
    try:
        figure = pyplot_free_figure((9, 5))
    except ImportError:
        logger.warning("matplotlib is not installed, so no chart was written to %s (pip install matplotlib).", path)
        return None
    memory_axes, busy_axes = figure.subplots(2, 1, sharex=True)
    for device, points in report.timeline.items():
        seconds = [t for t, _, _ in points]
        memory_axes.plot(seconds, [u / GIB for _, u, _ in points], label=f"GPU {device}")
        busy = [(t, b) for t, _, b in points if b is not None]
        if busy:
            busy_axes.plot(*zip(*busy), label=f"GPU {device}")
    memory_axes.set_ylabel("memory used (GiB)")
    memory_axes.set_title(f"GPU memory ({report.source})")
    busy_axes.set_ylabel("utilisation (%)")
    busy_axes.set_xlabel("seconds")
    for axes in (memory_axes, busy_axes):
        if axes.lines:
            axes.legend(loc="upper left")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    return str(path)
