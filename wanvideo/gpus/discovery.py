"""Which GPUs this process can use, and what they are: NVML first, torch.cuda as the fallback.

GPU indices are always torch's (after CUDA_VISIBLE_DEVICES); NVML numbers GPUs in PCI bus order,
which is kept as `nvml_index`. Nothing here initialises CUDA: worker processes forked later need
it uninitialised.
"""
import contextlib
import logging
import os
import re
import sys

import torch

from .links import add_links

logger = logging.getLogger(__name__)

__all__ = ["GIB", "get_available_gpus", "get_gpu_info", "format_gpu_status", "print_gpu_status"]

GIB = 2**30
# The pynvml module, or an object with the same functions (tests put a fake here). None: import
# pynvml on first use; False: not installed.
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


def get_available_gpus():
    """Indices of the CUDA devices this process can use (after CUDA_VISIBLE_DEVICES); [] without CUDA."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _load_nvml(nvml=None):
    """The NVML binding to use (`nvml` when given, else pynvml), or None when there is none."""
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
            **_pcie_link(nvml, handle), _handle=handle))
    return records


def _pcie_link(nvml, handle):
    """The PCIe link NVML reports: pcie_generation / pcie_width, its maximum (the lower of what the
    GPU and the slot support: what it runs at under load, which the link estimates use), and
    pcie_current_generation / pcie_current_width, what it runs at now (idle GPUs drop to Gen1 to
    save power; shown in the status table only). Where NVML has no maximum, the current values."""
    current_generation = _optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
    current_width = _optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
    # nvmlDeviceGetMaxPcieLinkGeneration: the device with this system; ...GpuMax...: the GPU alone
    maxima = [g for g in (_optional(getattr(nvml, "nvmlDeviceGetMaxPcieLinkGeneration", None), handle),
                          _optional(getattr(nvml, "nvmlDeviceGetGpuMaxPcieLinkGeneration", None), handle)) if g]
    max_width = _optional(getattr(nvml, "nvmlDeviceGetMaxPcieLinkWidth", None), handle)
    return dict(pcie_generation=min(maxima) if maxima else current_generation,
                pcie_width=max_width or current_width,
                pcie_current_generation=current_generation, pcie_current_width=current_width)


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


def _add_torch_peers(gpus, ask=None):
    """Fill 'torch_peers': the torch indices torch.cuda.can_device_access_peer says each GPU can reach
    directly, or None when torch was not asked. It is asked only when CUDA is already initialised in
    this process (ask=None), since asking initialises it; ask=True asks anyway."""
    asked = ask if ask is not None else (torch.cuda.is_available() and torch.cuda.is_initialized())
    for gpu in gpus:
        gpu["torch_peers"] = None
        if not asked:
            continue
        try:
            gpu["torch_peers"] = [other["index"] for other in gpus if other is not gpu
                                  and torch.cuda.can_device_access_peer(gpu["index"], other["index"])]
        except Exception as error:  # a device torch cannot open: say nothing rather than fail the inventory
            logger.info("torch cannot tell the peer access of GPU %d: %s", gpu["index"], error)


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
            pcie_width=None, pcie_current_generation=None, pcie_current_width=None, nvlink_peers=[], peers=peers,
            torch_peers=list(peers), source="torch"))
    return add_links(gpus)


def get_gpu_info(nvml=None, ask_torch_peers=None):
    """The GPUs this process can use, in torch order -> list of dicts:

    index (torch), nvml_index, name, uuid, pci_bus_id, total_memory / free_memory / used_memory
    (bytes), utilization (%), temperature (C), power (W), compute_capability (major, minor),
    pcie_generation, pcie_width (the link's maximum, which the bandwidth estimates use),
    pcie_current_generation, pcie_current_width (the link now: lower while the GPU idles),
    nvlink_peers and peers (torch indices reachable by NVLink, or by NVLink or PCIe peer-to-peer, as
    NVML says), torch_peers (those torch.cuda.can_device_access_peer reports; None when not asked:
    torch is asked only once CUDA is initialised in this process, or with ask_torch_peers=True),
    links (per other GPU: {'to', 'kind': 'nvlink' | 'pcie_p2p' | 'pcie_host', 'gb_per_s'}: see
    links.py), source ('nvml' or 'torch'). Fields a GPU does not report are None. No GPU, no driver:
    [] (logged), never an exception. `nvml`: a pynvml-like object (for tests).
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
            _add_torch_peers(gpus, ask_torch_peers)
            add_links(gpus)
            if not gpus:
                logger.info("NVML sees %d GPU(s), none visible to this process (CUDA_VISIBLE_DEVICES=%r).",
                            len(records), os.environ.get("CUDA_VISIBLE_DEVICES"))
            return gpus
        except Exception as error:
            logger.info("NVML is not usable here (%s); asking torch.cuda instead.", error)
    return _torch_gpu_info()


# --- status table --------------------------------------------------------------------------------

LINK_LABELS = {"nvlink": "NVLink", "pcie_p2p": "P2P", "pcie_host": "host"}


def _links_text(gpu):
    """'NVLink 1 (450 GB/s); P2P 2 (50 GB/s)': the GPUs reached each way and the estimated GB/s per
    direction ('host': PCIe through host memory, no peer access); '-' when nothing is known."""
    links = gpu.get("links")
    if links is None:  # an inventory made without links: the peers as NVML gave them
        nvlink = gpu.get("nvlink_peers") or []
        other = [p for p in gpu.get("peers") or [] if p not in nvlink]
        parts = ([f"NVLink {','.join(map(str, nvlink))}"] if nvlink else []) + (
            [f"P2P {','.join(map(str, other))}"] if other else [])
        return "; ".join(parts) or "-"
    groups = {}
    for link in links:
        groups.setdefault((link["kind"], link["gb_per_s"]), []).append(str(link["to"]))
    return "; ".join(f"{LINK_LABELS.get(kind, kind)} {','.join(ids)} ({rate:.0f} GB/s)"
                     for (kind, rate), ids in groups.items()) or "-"


def _pcie_text(gpu):
    """'Gen4 x16' (the link's maximum), with '(now Gen1 x16)' when it runs slower at the moment; '-'."""
    generation, width = gpu.get("pcie_generation"), gpu.get("pcie_width")
    if generation is None:
        return "-"
    text = f"Gen{generation} x{'-' if width is None else width}"
    now = (gpu.get("pcie_current_generation"), gpu.get("pcie_current_width"))
    if now[0] is not None and now != (generation, width):
        text += f" (now Gen{now[0]} x{'-' if now[1] is None else now[1]})"
    return text


def format_gpu_status(gpus=None):
    """The GPU table as text (gpus: an inventory as from get_gpu_info(); None: read it now)."""
    gpus = get_gpu_info() if gpus is None else gpus
    if not gpus:
        return ("No CUDA GPU found. Install the NVIDIA driver and a CUDA build of PyTorch, or check "
                f"CUDA_VISIBLE_DEVICES (now {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}).")
    unknown = lambda value, fmt: "-" if value is None else fmt.format(value)
    rows = [("GPU", "Name", "Memory used / total", "Util", "Temp", "Power", "PCIe", "Links")]
    for g in gpus:
        pcie = _pcie_text(g)
        used = g["used_memory"] if g.get("used_memory") is not None else g["total_memory"] - g["free_memory"]
        rows.append((str(g["index"]), g.get("name", "?"), f"{used / GIB:.1f} / {g['total_memory'] / GIB:.1f} GiB",
                     unknown(g.get("utilization"), "{}%"), unknown(g.get("temperature"), "{}C"),
                     unknown(g.get("power"), "{:.0f} W"), pcie, _links_text(g)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def print_gpu_status(gpus=None, file=None):
    """Print the GPU table: index, name, memory used / total, utilisation, temperature, power, PCIe
    link and the links to the other GPUs (gpus: an inventory as from get_gpu_info(); None: read it now)."""
    print(format_gpu_status(gpus), file=file or sys.stdout)
