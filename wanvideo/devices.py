"""Small device helpers shared by every floor: the one way to read a device list, memory release,
free memory, and the out-of-memory error that names its device."""
import contextlib
import gc
import re

import torch

GPU_IDS_EXAMPLE = 'give GPU ids as a list such as [0, 1] or a string such as "0,1"'


class DeviceOutOfMemoryError(MemoryError):
    """Out of memory on `device` while placing a model (strategies drop that device and plan again)."""

    def __init__(self, message, device):
        super().__init__(message)
        self.device = device


def release_memory():
    """Collect garbage and return cached CUDA memory to the driver (after unloading or a failure)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_bytes(device):
    """Bytes a new allocation can take on a CUDA device: free memory plus what PyTorch's cache holds
    unused; None for devices without a figure (CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return free_and_total_bytes(device)[0]


def free_and_total_bytes(device):
    """(free_bytes, total bytes) of a CUDA device, from one driver query."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def device_context(device):
    """Make `device` current while launching work on it (a no-op for the CPU)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def parse_gpu_ids(gpu_ids):
    """[0, 1], (0, 1), 2, '0,1' or ' 0, 1 ' -> [0, 1]; ValueError naming the problem and the fix."""
    if gpu_ids is None or (isinstance(gpu_ids, str) and not gpu_ids.strip()):
        raise ValueError(f"No GPU ids were given: {GPU_IDS_EXAMPLE}.")
    if isinstance(gpu_ids, str):
        entries = [e.strip() for e in gpu_ids.split(",")]
        if "" in entries:
            raise ValueError(f"GPU ids {gpu_ids!r} have an empty entry (a doubled or trailing comma): "
                             f"{GPU_IDS_EXAMPLE}.")
    elif isinstance(gpu_ids, int) and not isinstance(gpu_ids, bool):
        entries = [gpu_ids]
    else:
        try:
            entries = list(gpu_ids)
        except TypeError:
            raise ValueError(f"GPU ids {gpu_ids!r} are neither a list nor a string: {GPU_IDS_EXAMPLE}.") from None
        if not entries:
            raise ValueError(f"The list of GPU ids is empty: {GPU_IDS_EXAMPLE}.")
    ids = []
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            value = entry
        elif isinstance(entry, str) and re.fullmatch(r"\s*[+-]?\d+\s*", entry):
            value = int(entry)
        else:
            raise ValueError(f"GPU id {entry!r} is not a whole number: {GPU_IDS_EXAMPLE}.")
        if value < 0:
            raise ValueError(f"GPU id {value} is negative: GPUs are numbered from 0 (see print_gpu_status()).")
        if value in ids:
            raise ValueError(f"GPU {value} is listed twice in {gpu_ids!r}: list each GPU once.")
        ids.append(value)
    return ids


def parse_devices(devices):
    """The one device parser: None (every CUDA GPU, else the CPU), 'cpu', 'cuda:1', '0,1', 3, or a
    list mixing GPU ids, device strings and torch.device -> list of torch.device (repeats kept: a
    strategy may run one device twice). A bare number is a CUDA GPU id."""
    if devices is None:
        return ([torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available()
                else [torch.device("cpu")])
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",")]
    elif isinstance(devices, (int, torch.device)):
        devices = [devices]
    parsed = []
    for entry in devices:
        if isinstance(entry, torch.device):
            parsed.append(entry)
        elif (isinstance(entry, int) and not isinstance(entry, bool)) or (isinstance(entry, str) and entry.isdigit()):
            parsed.append(torch.device("cuda", parse_gpu_ids([entry])[0]))
        else:
            try:
                parsed.append(torch.device(entry))
            except (RuntimeError, TypeError):
                raise ValueError(f"{entry!r} is not a device: give GPU ids such as \"0,1\", or devices such as "
                                 "'cuda:0' or 'cpu'.") from None
    if not parsed:
        raise ValueError("The list of devices is empty: give GPU ids such as \"0,1\", or 'cpu'.")
    return parsed


def check_devices_available(devices):
    """parse_devices, then ValueError naming the device when a CUDA device cannot be used here (a
    CPU-only PyTorch, no driver, an index past the GPUs this process sees) -> list of torch.device.
    Said up front, in words, instead of PyTorch's "Torch not compiled with CUDA enabled" mid-run."""
    parsed = parse_devices(devices)
    cuda = [d for d in parsed if d.type == "cuda"]
    if cuda and not torch.cuda.is_available():
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA driver or GPU is usable"
        raise ValueError(f"{', '.join(map(str, cuda))} {'name' if len(cuda) > 1 else 'names'} a CUDA GPU, but CUDA is "
                         f"not available here ({why}): run on the CPU (devices='cpu'), or install a CUDA build of PyTorch.")
    count = torch.cuda.device_count() if cuda else 0
    missing = [str(d) for d in cuda if d.index is not None and d.index >= count]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'do' if len(missing) > 1 else 'does'} not exist: this process sees "
                         f"{count} GPU(s), cuda:0 to cuda:{count - 1}.")
    return parsed
