"""The GPUs of this machine: what they are, whether they can be used, and what they did.

    discovery.py    get_gpu_info (NVML, else torch.cuda; torch's numbering after
                    CUDA_VISIBLE_DEVICES), get_available_gpus, the status table
    links.py        how two GPUs reach each other (nvlink / pcie_p2p / pcie_host) and about how fast
    speed.py        relative_speeds: a short bf16 matmul probe per GPU model, cached
    validation.py   validate_gpu_setup: (ok, message naming the problem and the fix)
    monitor.py      monitor_memory_usage: memory and utilisation on a background thread, a chart

Everything runs on a machine without GPUs: inventories are empty, reports too. This floor sits
below the pipeline and the strategies and imports only wanvideo.devices beside the libraries.
"""
from .discovery import GIB, format_gpu_status, get_available_gpus, get_gpu_info, print_gpu_status
from .links import Link, link_between, slowest_link
from .monitor import MemoryMonitor, MemorySample, MemoryUsageReport, monitor_memory_usage
from .speed import relative_speeds
from .validation import validate_gpu_setup

__all__ = ["GIB", "get_gpu_info", "get_available_gpus", "format_gpu_status", "print_gpu_status",
           "validate_gpu_setup", "monitor_memory_usage", "MemoryMonitor", "MemoryUsageReport", "MemorySample",
           "Link", "link_between", "slowest_link", "relative_speeds"]
