"""GPUs for Wan 2.1: discovery, validation, monitoring, automatic configuration and benchmarks.

    from multi_gpu_utils import setup_optimal_parallelism, print_gpu_status, validate_gpu_setup
    config = setup_optimal_parallelism("model.safetensors")   # plan dict for the loader, with a reason
    print_gpu_status()                                         # one line per GPU
    is_valid, message = validate_gpu_setup([0, 1])             # or "0,1"

Everything runs on a machine without GPUs: inventories are empty, plans fall back to the CPU.
GPU details come from NVML (nvidia-ml-py) and fall back to torch.cuda. GPU indices are always
torch's (after CUDA_VISIBLE_DEVICES); NVML's own numbering is kept as `nvml_index`.
Command line: python multi_gpu_utils.py {status,validate,recommend,benchmark} --help
"""
import argparse
import contextlib
import datetime
import functools
import gc
import json
import logging
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "get_gpu_info", "format_gpu_status", "print_gpu_status", "parse_gpu_ids", "validate_gpu_setup",
    "monitor_memory_usage", "MemoryUsageReport", "get_optimal_gpu_config", "setup_optimal_parallelism",
    "benchmark_multi_gpu_performance", "register_benchmark_strategy", "BENCHMARK_STRATEGIES",
    "BenchmarkSettings", "BenchmarkRunnable", "main",
]

GIB = 2**30
# The pynvml module, or an object with the same functions (tests use a fake). None: import pynvml
# on first use; False: not installed.
_nvml = None
# NVML's C enum values from nvml.h (pynvml spells NVML_P2P_CAPS_INDEX_READ as a one-element tuple).
P2P_CAPS_INDEX_READ = 0
P2P_CAPS_INDEX_NVLINK = 2
P2P_STATUS_OK = 0
TEMPERATURE_GPU = 0
_warned = set()


def _warn_once(key, message, *args):
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


# --- discovery -----------------------------------------------------------------------------------

def _load_nvml(nvml=None):
    """The NVML binding to use, or None when there is none."""
    global _nvml
    if nvml is not None:
        return nvml
    if _nvml is None:
        try:
            import pynvml
            _nvml = pynvml
        except ImportError:
            logger.info("nvidia-ml-py is not installed, so GPU details come from torch.cuda only "
                        "(pip install nvidia-ml-py for utilisation, temperature, power and links).")
            _nvml = False
    return _nvml or None


@contextlib.contextmanager
def _nvml_session(nvml):
    nvml.nvmlInit()  # reference-counted by NVML: nested sessions are fine
    try:
        yield nvml
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _optional(query, *args):
    """An NVML field that some GPUs and drivers do not report (NotSupported, NoPermission...) -> None."""
    try:
        return query(*args)
    except Exception:  # NVML raises a different class per error code; any of them means 'unknown'
        return None


def _text(value):
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _normalize_bus_id(bus_id):
    """'00000000:18:00.0' or '0000:18:00.0' -> '0000:18:00.0' (NVML and CUDA pad the domain differently)."""
    match = re.fullmatch(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-9a-fA-F]+)", _text(bus_id).strip())
    if not match:
        return _text(bus_id).strip().lower()
    domain, bus, device, function = (int(part, 16) for part in match.groups())
    return f"{domain:04x}:{bus:02x}:{device:02x}.{function:x}"


def _read_nvml(nvml):
    """Every GPU NVML sees, in NVML order (PCI bus order), as dicts with a private '_handle'."""
    records = []
    for nvml_index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as error:
            logger.warning("NVML cannot read the memory of GPU %d (NVML numbering): %s; it is skipped.",
                           nvml_index, error)
            continue
        utilization = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = _optional(nvml.nvmlDeviceGetPowerUsage, handle)
        pci = _optional(nvml.nvmlDeviceGetPciInfo, handle)
        capability = _optional(nvml.nvmlDeviceGetCudaComputeCapability, handle)
        records.append(dict(
            nvml_index=nvml_index, name=_text(_optional(nvml.nvmlDeviceGetName, handle) or "unknown GPU"),
            uuid=_text(_optional(nvml.nvmlDeviceGetUUID, handle) or ""),
            pci_bus_id=_normalize_bus_id(pci.busId) if pci is not None else None,
            total_memory=int(memory.total), free_memory=int(memory.free), used_memory=int(memory.used),
            utilization=None if utilization is None else int(utilization.gpu),
            temperature=_optional(nvml.nvmlDeviceGetTemperature, handle, TEMPERATURE_GPU),
            power=None if power_mw is None else power_mw / 1000.0,
            compute_capability=None if capability is None else tuple(int(c) for c in capability),
            pcie_generation=_optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
            pcie_width=_optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
            _handle=handle))
    return records


def _torch_identities():
    """UUID and PCI bus id of each torch device, or None. Asked only when CUDA is already initialised
    in this process: initialising it here would break worker processes forked later."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    identities = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = getattr(props, "uuid", None)
        bus = (f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
               if hasattr(props, "pci_bus_id") else None)
        identities.append(dict(uuid=f"GPU-{uuid}" if uuid is not None else None, pci_bus_id=bus))
    return identities


def _visible_in_torch_order(records, cuda_visible_devices, identities):
    """NVML records (PCI bus order) -> those this process sees, in torch order, with 'index' set.

    With CUDA already initialised, match torch's devices by UUID or PCI bus id. Otherwise read
    CUDA_VISIBLE_DEVICES as CUDA does: comma-separated indices or GPU-UUIDs (unique prefixes
    allowed), ending at the first entry that is invalid or repeated; empty means no GPU.
    """
    if identities is not None:
        visible = []
        for index, identity in enumerate(identities):
            match = next((r for r in records if (identity["uuid"] and r["uuid"] == identity["uuid"])
                          or (identity["pci_bus_id"] and r["pci_bus_id"] == identity["pci_bus_id"])), None)
            if match is None:
                logger.warning("torch device %d (%s) is not among the GPUs NVML reports; it is left out.",
                               index, identity["uuid"] or identity["pci_bus_id"])
                continue
            visible.append({"index": index, **match})
        return visible
    if cuda_visible_devices is None:
        chosen, uses_indices = list(records), True
    else:
        chosen, uses_indices = [], False
        for entry in (e.strip() for e in cuda_visible_devices.split(",")):
            if re.fullmatch(r"-?\d+", entry):
                uses_indices = True
                record = records[int(entry)] if 0 <= int(entry) < len(records) else None
            elif entry.startswith("GPU-"):
                found = [r for r in records if r["uuid"].lower().startswith(entry.lower())]
                record = found[0] if len(found) == 1 else None
            else:
                record = None
            if record is None or record in chosen:
                if entry:
                    logger.info("CUDA_VISIBLE_DEVICES=%r: entry %r is %s, so CUDA ignores it and every entry "
                                "after it.", cuda_visible_devices, entry,
                                "a repeat" if record is not None else "not a GPU of this machine")
                break
            chosen.append(record)
    if uses_indices and len({r["name"] for r in records}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        _warn_once("device_order", "This machine mixes GPU models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA "
                   "may number the GPUs fastest first while NVML (and this inventory) use PCI bus order. Set "
                   "CUDA_DEVICE_ORDER=PCI_BUS_ID before starting Python so both agree.")
    return [{"index": index, **record} for index, record in enumerate(chosen)]


def _add_peers(nvml, gpus):
    """Fill 'nvlink_peers' and 'peers' (NVLink or PCIe peer-to-peer) with torch indices."""
    for gpu in gpus:
        gpu["nvlink_peers"], gpu["peers"] = [], []
        for other in gpus:
            if other is gpu:
                continue
            status = lambda caps: _optional(nvml.nvmlDeviceGetP2PStatus, gpu["_handle"], other["_handle"], caps)
            nvlink = status(P2P_CAPS_INDEX_NVLINK) == P2P_STATUS_OK
            if nvlink:
                gpu["nvlink_peers"].append(other["index"])
            if nvlink or status(P2P_CAPS_INDEX_READ) == P2P_STATUS_OK:
                gpu["peers"].append(other["index"])


def _torch_gpu_info():
    if not torch.cuda.is_available():
        logger.info("No CUDA GPU found (no NVML and torch.cuda.is_available() is False).")
        return []
    gpus = []
    count = torch.cuda.device_count()
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        peers = [j for j in range(count) if j != index and torch.cuda.can_device_access_peer(index, j)]
        gpus.append(dict(
            index=index, nvml_index=None, name=props.name,
            uuid=f"GPU-{props.uuid}" if getattr(props, "uuid", None) is not None else "",
            pci_bus_id=(f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
                        if hasattr(props, "pci_bus_id") else None),
            total_memory=int(total), free_memory=int(free), used_memory=int(total - free), utilization=None,
            temperature=None, power=None, compute_capability=(props.major, props.minor), pcie_generation=None,
            pcie_width=None, nvlink_peers=[], peers=peers, source="torch"))
    return gpus


def get_gpu_info(nvml=None):
    """The GPUs this process can use, in torch order -> list of dicts:

    index (torch), nvml_index, name, uuid, pci_bus_id, total_memory / free_memory / used_memory
    (bytes), utilization (%), temperature (C), power (W), compute_capability (major, minor),
    pcie_generation, pcie_width, nvlink_peers and peers (torch indices reachable by NVLink, or by
    NVLink or PCIe peer-to-peer), source ('nvml' or 'torch'). Fields a GPU does not report are None.
    No GPU, no driver: [] (logged), never an exception. `nvml`: a pynvml-like object (for tests).
    """
    nvml = _load_nvml(nvml)
    if nvml is not None:
        try:
            with _nvml_session(nvml):
                records = _read_nvml(nvml)
                gpus = _visible_in_torch_order(records, os.environ.get("CUDA_VISIBLE_DEVICES"), _torch_identities())
                _add_peers(nvml, gpus)
            for gpu in gpus:
                del gpu["_handle"]
                gpu["source"] = "nvml"
            if not gpus:
                logger.info("NVML sees %d GPU(s), none visible to this process (CUDA_VISIBLE_DEVICES=%r).",
                            len(records), os.environ.get("CUDA_VISIBLE_DEVICES"))
            return gpus
        except Exception as error:
            logger.info("NVML is not usable here (%s); asking torch.cuda instead.", error)
    return _torch_gpu_info()


# --- status table --------------------------------------------------------------------------------

def _peers_text(gpu):
    nvlink = gpu.get("nvlink_peers") or []
    other = [p for p in gpu.get("peers") or [] if p not in nvlink]
    parts = ([f"NVLink {','.join(map(str, nvlink))}"] if nvlink else []) + ([f"P2P {','.join(map(str, other))}"]
                                                                            if other else [])
    return "; ".join(parts) or "-"


def format_gpu_status(gpus=None):
    """The GPU table as text (gpus: an inventory as from get_gpu_info(); None: read it now)."""
    gpus = get_gpu_info() if gpus is None else gpus
    if not gpus:
        return ("No CUDA GPU found. Install the NVIDIA driver and a CUDA build of PyTorch, or check "
                f"CUDA_VISIBLE_DEVICES (now {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}).")
    unknown = lambda value, fmt: "-" if value is None else fmt.format(value)
    rows = [("GPU", "Name", "Memory used / total", "Util", "Temp", "Power", "PCIe", "Peers")]
    for g in gpus:
        pcie = ("-" if g.get("pcie_generation") is None else
                f"Gen{g['pcie_generation']} x{unknown(g.get('pcie_width'), '{}')}")
        used = g["used_memory"] if g.get("used_memory") is not None else g["total_memory"] - g["free_memory"]
        rows.append((str(g["index"]), g.get("name", "?"), f"{used / GIB:.1f} / {g['total_memory'] / GIB:.1f} GiB",
                     unknown(g.get("utilization"), "{}%"), unknown(g.get("temperature"), "{}C"),
                     unknown(g.get("power"), "{:.0f} W"), pcie, _peers_text(g)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def print_gpu_status(gpus=None, file=None):
    """Print the GPU table: index, name, memory used / total, utilisation, temperature, power, PCIe
    link and peers (gpus: an inventory as from get_gpu_info(); None: read it now)."""
    print(format_gpu_status(gpus), file=file or sys.stdout)


# --- validation ----------------------------------------------------------------------------------

def parse_gpu_ids(gpu_ids):
    """[0, 1], (0, 1), 2, '0,1' or ' 0, 1 ' -> [0, 1]; ValueError naming the problem and the fix."""
    example = 'give GPU ids as a list such as [0, 1] or a string such as "0,1"'
    if gpu_ids is None or (isinstance(gpu_ids, str) and not gpu_ids.strip()):
        raise ValueError(f"No GPU ids were given: {example}.")
    if isinstance(gpu_ids, str):
        entries = [e.strip() for e in gpu_ids.split(",")]
        if "" in entries:
            raise ValueError(f"GPU ids {gpu_ids!r} have an empty entry (a doubled or trailing comma): {example}.")
    elif isinstance(gpu_ids, int) and not isinstance(gpu_ids, bool):
        entries = [gpu_ids]
    else:
        try:
            entries = list(gpu_ids)
        except TypeError:
            raise ValueError(f"GPU ids {gpu_ids!r} are neither a list nor a string: {example}.") from None
        if not entries:
            raise ValueError(f"The list of GPU ids is empty: {example}.")
    ids = []
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            value = entry
        elif isinstance(entry, str) and re.fullmatch(r"\s*[+-]?\d+\s*", entry):
            value = int(entry)
        else:
            raise ValueError(f"GPU id {entry!r} is not a whole number: {example}.")
        if value < 0:
            raise ValueError(f"GPU id {value} is negative: GPUs are numbered from 0 (see print_gpu_status()).")
        if value in ids:
            raise ValueError(f"GPU {value} is listed twice in {gpu_ids!r}: list each GPU once.")
        ids.append(value)
    return ids


def validate_gpu_setup(gpu_ids, min_free_bytes=None, max_utilization=None, gpus=None):
    """Can these GPUs be used? -> (is_valid, message).

    gpu_ids: list of ints or a string such as "0,1,2,3" (torch indices). min_free_bytes: each GPU
    must have at least this much free memory; max_utilization: no GPU may be busier (percent).
    gpus: an inventory as from get_gpu_info() (None: read it now). A failure names the problem and
    the fix; success summarises the GPUs.
    """
    if min_free_bytes is not None and min_free_bytes < 0:
        raise ValueError(f"min_free_bytes={min_free_bytes!r} is negative; give a number of bytes or None.")
    if max_utilization is not None and not 0 <= max_utilization <= 100:
        raise ValueError(f"max_utilization={max_utilization!r} is not a percentage from 0 to 100.")
    try:
        ids = parse_gpu_ids(gpu_ids)
    except ValueError as error:
        return False, str(error)
    gpus = get_gpu_info() if gpus is None else gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    if not gpus:
        return False, (f"GPUs {ids} were asked for, but this process sees no CUDA GPU. Install the NVIDIA driver "
                       f"and a CUDA build of PyTorch, check CUDA_VISIBLE_DEVICES (now {visible!r}), or run on the CPU.")
    by_index = {g["index"]: g for g in gpus}
    missing = [i for i in ids if i not in by_index]
    if missing:
        return False, (f"GPU{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                       f"{'do' if len(missing) > 1 else 'does'} not exist: this process sees {len(gpus)} GPU"
                       f"{'s' if len(gpus) > 1 else ''} ({', '.join(str(g['index']) for g in gpus)}). Use those ids; "
                       f"CUDA_VISIBLE_DEVICES (now {visible!r}) renumbers the GPUs it lists from 0.")
    problems = []
    for i in ids:
        gpu = by_index[i]
        if min_free_bytes is not None and gpu["free_memory"] < min_free_bytes:
            problems.append(f"GPU {i} ({gpu.get('name', '?')}) has {gpu['free_memory'] / GIB:.1f} GiB free, less than "
                            f"the {min_free_bytes / GIB:.1f} GiB needed: close the programs using it (nvidia-smi lists "
                            "them), choose another GPU, or need less (fp8 quantization, block swap)")
        utilization = gpu.get("utilization")
        if max_utilization is not None and utilization is not None and utilization > max_utilization:
            problems.append(f"GPU {i} ({gpu.get('name', '?')}) is {utilization}% busy, above the {max_utilization}% "
                            "allowed: wait for the job running on it, or choose another GPU")
    if problems:
        return False, "; ".join(problems) + "."
    return True, (f"{len(ids)} GPU{'s' if len(ids) > 1 else ''} ready: " + "; ".join(
        f"GPU {i} {by_index[i].get('name', '?')}, {by_index[i]['free_memory'] / GIB:.1f} GiB free of "
        f"{by_index[i]['total_memory'] / GIB:.1f} GiB" for i in ids) + ".")


# --- monitoring ----------------------------------------------------------------------------------

@dataclass
class MemorySample:
    time: float          # seconds since the monitor started
    used_bytes: dict     # torch index -> bytes in use
    utilization: dict    # torch index -> percent, or None where unknown


@dataclass
class MemoryUsageReport:
    """What monitor_memory_usage saw. source: 'nvml' (memory used on the whole GPU, all processes),
    'torch' (this process' tensors, torch.cuda.memory_allocated), 'custom' (an injected sampler) or
    'none' (no GPU). Per device (torch index): peak / mean bytes and utilisation."""
    devices: list = field(default_factory=list)
    source: str = "none"
    samples: list = field(default_factory=list)
    duration: float = 0.0
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


def _pyplot_free_figure(figsize):
    """A matplotlib Figure drawn by the Agg backend, without pyplot (no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def _save_memory_chart(report, path):
    try:
        figure = _pyplot_free_figure((9, 5))
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


# --- automatic configuration ---------------------------------------------------------------------

def _checkpoint_info(checkpoint_info_or_path):
    from wanvideo.checkpoint import CheckpointInfo, inspect_checkpoint
    if isinstance(checkpoint_info_or_path, CheckpointInfo):
        return checkpoint_info_or_path
    return inspect_checkpoint(os.fspath(checkpoint_info_or_path))


def get_optimal_gpu_config(checkpoint_info_or_path, gpus=None, width=832, height=480, num_frames=81,
                           base_precision="bf16", quantization="disabled", cfg=True, batch_size=1):
    """The parallelism plan for this checkpoint on these GPUs -> dict for the loader.

    Reads only the checkpoint header. Keys: parallelism_type ('none', 'data_parallel',
    'block_distribution', 'distributed'), gpu_ids, base_precision, quantization, blocks_to_swap,
    blocks_to_swap_per_gpu, blocks_per_gpu, ulysses_degree, ring_degree, cfg_degree,
    estimated_memory_per_gpu (bytes, in gpu_ids order) and reason. gpus: an inventory as from
    get_gpu_info() (None: read it now). See wanvideo/parallel/plan.py for the memory model.
    """
    from wanvideo.parallel.plan import plan_parallelism
    info = _checkpoint_info(checkpoint_info_or_path)
    gpus = get_gpu_info() if gpus is None else gpus
    return plan_parallelism(info, gpus, width=width, height=height, num_frames=num_frames,
                            base_precision=base_precision, quantization=quantization, cfg=cfg, batch_size=batch_size)


def setup_optimal_parallelism(model_path, **settings):
    """get_optimal_gpu_config(model_path, **settings), logged: the plan to hand to the loader."""
    config = get_optimal_gpu_config(model_path, **settings)
    logger.info("Parallelism plan: %s on GPUs %s. %s", config["parallelism_type"], config["gpu_ids"] or "none (CPU)",
                config["reason"])
    return config


# --- benchmark -----------------------------------------------------------------------------------

@dataclass
class BenchmarkSettings:
    """What every benchmarked configuration runs: the same inputs, the same number of steps."""
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


def _release_model(model, devices):
    def release():
        model.to("meta")  # drop the weights wherever they are
        gc.collect()
        if any(d.type == "cuda" for d in devices):
            torch.cuda.empty_cache()
    return release


@register_benchmark_strategy("single_device")
def _single_device(model_path, devices, settings):
    """The whole model on the first device: the baseline."""
    from wanvideo.checkpoint import load_wan_model
    model = load_wan_model(model_path, devices[0], settings.base_precision, settings.quantization,
                           settings.attention_mode)
    return BenchmarkRunnable(lambda inputs: model(**inputs), devices[:1], _release_model(model, devices[:1]))


@register_benchmark_strategy("block_swap")
def _block_swap(model_path, devices, settings):
    """The model on the first device with blocks_to_swap blocks kept in CPU memory and streamed in."""
    from wanvideo.checkpoint import load_wan_model
    from wanvideo.parallel.offload import BlockSwapSettings, enable_block_swap
    model = load_wan_model(model_path, "cpu", settings.base_precision, settings.quantization, settings.attention_mode)
    blocks_to_swap = settings.blocks_to_swap if settings.blocks_to_swap is not None else model.num_layers // 2
    swapper = enable_block_swap(model, devices[0], BlockSwapSettings(blocks_to_swap=blocks_to_swap))
    release_model = _release_model(model, devices[:1])

    def release():
        swapper.remove(restore_device="cpu")  # frees the pinned host buffers and the device slots
        release_model()
    return BenchmarkRunnable(lambda inputs: model(**inputs), devices[:1], release)


def _strategy_pipeline(name, model_path, devices, settings):
    from wanvideo.parallel import load_parallel_pipeline
    from wanvideo.pipeline import LoadSettings
    pipeline = load_parallel_pipeline(model_path, name, devices=devices, settings=LoadSettings(
        base_precision=settings.base_precision, quantization=settings.quantization,
        attention_mode=settings.attention_mode), width=settings.width, height=settings.height,
        num_frames=settings.num_frames)
    return BenchmarkRunnable(lambda inputs: pipeline.model(**inputs), list(dict.fromkeys(devices)), pipeline.unload)


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


def _synchronize(devices):
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _parse_devices(devices):
    """None / 'cpu' / '0,1' / [0, 'cuda:1', torch.device] -> list of torch.device."""
    if devices is None:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
            else [torch.device("cpu")]
    if isinstance(devices, (str, int, torch.device)):
        devices = [d.strip() for d in devices.split(",")] if isinstance(devices, str) else [devices]
    parsed = [torch.device("cuda", int(d)) if isinstance(d, int) or (isinstance(d, str) and d.isdigit())
              else torch.device(d) for d in devices]
    if any(d.type == "cuda" for d in parsed) and not torch.cuda.is_available():
        raise ValueError(f"devices {devices!r} name CUDA GPUs, but CUDA is not available here: use devices='cpu'.")
    return parsed


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
        logger.exception("Benchmark configuration %r failed to build", label)
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
        logger.exception("Benchmark configuration %r failed while running", label)
        row.update(status="failed", note=f"{type(error).__name__}: {error}")
        output = None
    finally:
        runnable.release()
    return row, output


def benchmark_multi_gpu_performance(model_path, configs=None, steps=3, width=832, height=480, num_frames=81,
                                    output_dir=None, devices=None, **settings):
    """Run each configuration for `steps` denoising forwards on the same inputs -> list of rows.

    configs: names from BENCHMARK_STRATEGIES, or dicts {"strategy": name, "name": label, plus
    BenchmarkSettings fields to override, e.g. "blocks_to_swap": 10}; None: every registered
    strategy. devices: 'cpu', '0,1', [0, 1] or torch devices (None: all GPUs, else the CPU).
    settings: other BenchmarkSettings fields (warmup_steps, base_precision, quantization, cfg,
    batch_size, blocks_to_swap, text_tokens, seed, attention_mode).
    Each row: config, strategy, devices, status ('ok', 'skipped', 'failed'), seconds_per_step,
    step_seconds, peak_memory_per_gpu (bytes, CUDA devices only), speedup_vs_single and
    relative_error_vs_single (against the single_device row of the same run), note.
    output_dir: also write benchmark_results.json and benchmark_chart.png there.
    """
    from wanvideo.checkpoint import inspect_checkpoint
    base = BenchmarkSettings(width=width, height=height, num_frames=num_frames, steps=steps, **settings)
    if base.steps < 1 or base.warmup_steps < 0:
        raise ValueError(f"steps={base.steps}, warmup_steps={base.warmup_steps}: give at least one step and no "
                         "negative warm-up.")
    info = inspect_checkpoint(os.fspath(model_path))
    devices = _parse_devices(devices)
    names = list(BENCHMARK_STRATEGIES) if configs is None else configs
    plans = []
    for entry in names:
        entry = {"strategy": entry} if isinstance(entry, str) else dict(entry)
        strategy = entry.pop("strategy", None)
        if strategy not in BENCHMARK_STRATEGIES:
            raise ValueError(f"Unknown benchmark strategy {strategy!r}; registered: {', '.join(BENCHMARK_STRATEGIES)}.")
        label = entry.pop("name", strategy)
        plans.append((label, strategy, replace(base, **entry)))

    rows, reference = [], None
    for label, strategy, config_settings in plans:
        inputs, timesteps = make_benchmark_inputs(info.config, config_settings)
        logger.info("Benchmarking %s on %s", label, ", ".join(map(str, devices)))
        row, output = _run_config(label, strategy, model_path, devices, config_settings, inputs, timesteps)
        row["settings"] = asdict(config_settings)
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
    os.makedirs(output_dir, exist_ok=True)
    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  model=info.summary(), devices=[str(d) for d in devices],
                  device_names=[torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"],
                  torch=torch.__version__, results=table)
    with open(os.path.join(output_dir, "benchmark_results.json"), "w") as f:
        json.dump(record, f, indent=2)
    try:
        figure = _pyplot_free_figure((9, 4))
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


def format_benchmark_table(table):
    rows = [("config", "status", "s/step", "speed-up", "rel. error", "peak memory", "devices / note")]
    for r in table:
        memory = ", ".join(f"{d}: {b / GIB:.1f} GiB" for d, b in r["peak_memory_per_gpu"].items()) or "-"
        number = lambda value, fmt: "-" if value is None else fmt.format(value)
        rows.append((r["config"], r["status"], number(r["seconds_per_step"], "{:.3f}"),
                     number(r["speedup_vs_single"], "{:.2f}x"), number(r["relative_error_vs_single"], "{:.1e}"),
                     memory, r["note"] or ", ".join(r["devices"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


# --- command line --------------------------------------------------------------------------------

def _add_workload_arguments(parser):
    parser.add_argument("--width", type=int, default=832, help="video width in pixels (default 832)")
    parser.add_argument("--height", type=int, default=480, help="video height in pixels (default 480)")
    parser.add_argument("--frames", type=int, default=81, help="number of frames (default 81)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="base precision")
    parser.add_argument("--quantization", default="disabled", choices=("disabled", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_fast"),
                        help="fp8 storage of the block weights")
    parser.add_argument("--batch-size", type=int, default=1, help="videos per step (default 1)")
    parser.add_argument("--no-cfg", action="store_true", help="guidance scale 1: no uncond branch")


def _build_parser():
    parser = argparse.ArgumentParser(prog="multi_gpu_utils.py", description="GPUs for Wan 2.1: status, validation, "
                                     "recommended parallelism, benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="table of the GPUs", description="Print the GPUs this process sees.")
    status.add_argument("--json", action="store_true", help="print the inventory as JSON")
    validate = commands.add_parser("validate", help="check GPU ids", description="Check that GPU ids can be used.")
    validate.add_argument("gpu_ids", help='GPU ids, e.g. "0,1"')
    validate.add_argument("--min-free-gib", type=float, help="each GPU needs at least this much free memory")
    validate.add_argument("--max-utilization", type=float, help="no GPU may be busier (percent)")
    recommend = commands.add_parser("recommend", help="plan the parallelism for a model",
                                    description="Read a checkpoint header and print the best plan for these GPUs.")
    recommend.add_argument("model", help="path of a Wan 2.1 .safetensors file")
    _add_workload_arguments(recommend)
    recommend.add_argument("--json", action="store_true", help="print the plan as JSON")
    bench = commands.add_parser("benchmark", help="time configurations on a model",
                                description="Run a few denoising forwards per configuration on the same inputs.")
    bench.add_argument("model", help="path of a Wan 2.1 .safetensors file")
    _add_workload_arguments(bench)
    bench.add_argument("--configs", help=f"comma-separated strategies (default: all; "
                                         f"registered: {', '.join(BENCHMARK_STRATEGIES)})")
    bench.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    bench.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first (default 1)")
    bench.add_argument("--blocks-to-swap", type=int, help="blocks kept in CPU memory for block_swap (default half)")
    bench.add_argument("--devices", help='"cpu", or GPU ids such as "0,1" (default: every GPU, else the CPU)')
    bench.add_argument("--output-dir", help="write benchmark_results.json and benchmark_chart.png here")
    return parser


def main(argv=None):
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "status":
        gpus = get_gpu_info()
        print(json.dumps(gpus, indent=2) if args.json else format_gpu_status(gpus))
        return 0
    if args.command == "validate":
        ok, message = validate_gpu_setup(args.gpu_ids, None if args.min_free_gib is None else args.min_free_gib * GIB,
                                         args.max_utilization)
        print(("OK: " if ok else "Not usable: ") + message)
        return 0 if ok else 1
    workload = dict(width=args.width, height=args.height, num_frames=args.frames, base_precision=args.precision,
                    quantization=args.quantization, cfg=not args.no_cfg, batch_size=args.batch_size)
    if args.command == "recommend":
        config = get_optimal_gpu_config(args.model, **workload)
        if args.json:
            print(json.dumps(config, indent=2))
        else:
            for key, value in config.items():
                if key not in ("reason", "estimated_memory_per_gpu"):
                    print(f"{key:24} {value}")
            print(f"{'estimated_memory_per_gpu':24} "
                  f"{[f'{b / GIB:.1f} GiB' for b in config['estimated_memory_per_gpu']]}")
            print(f"\n{config['reason']}")
        return 0
    table = benchmark_multi_gpu_performance(
        args.model, configs=args.configs.split(",") if args.configs else None, steps=args.steps, width=args.width,
        height=args.height, num_frames=args.frames, output_dir=args.output_dir, devices=args.devices,
        base_precision=args.precision, quantization=args.quantization, cfg=not args.no_cfg,
        batch_size=args.batch_size, warmup_steps=args.warmup_steps, blocks_to_swap=args.blocks_to_swap)
    print(format_benchmark_table(table))
    return 0 if all(row["status"] != "failed" for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
