"""How two GPUs reach each other, and about how fast: the link model the planner weighs traffic by.

Each pair of GPUs is joined one of three ways:

    nvlink      NVLink (NVML's P2P status for NVLink): the per-direction NVLink bandwidth below;
    pcie_p2p    PCIe with peer access (NVML's P2P read status or torch.cuda.can_device_access_peer):
                copies go card to card through the PCIe switch / root complex, at the slower of the
                two cards' PCIe links;
    pcie_host   PCIe without peer access: every byte is staged through host memory (NCCL's shared
                memory transport; a copy GPU -> host, then host -> GPU), estimated at HOST_PATH_FACTOR
                of the slower card's PCIe rate.

All figures are GB/s (10**9 bytes) per direction, estimates for planning, not measurements.

Sources (figures as published; the effective rates are our estimate):
  PCIe     PCI-SIG base specifications, per lane and direction: Gen1 2.5 GT/s and Gen2 5 GT/s with 8b/10b
           coding (0.25 and 0.5 GB/s), Gen3 8 GT/s, Gen4 16 GT/s and Gen5 32 GT/s with 128b/130b coding
           (0.985, 1.969 and 3.938 GB/s), Gen6 64 GT/s (FLIT mode, about 7.56 GB/s). PCIE_EFFICIENCY
           takes off the packet headers and flow control at 256-byte payloads: Gen4 x16 -> 25.2 GB/s,
           Gen5 x16 -> 50.4 GB/s, in line with the pinned host-device copies CUDA's bandwidthTest reports
           on such hosts (about 25 and 50-55 GB/s).
  NVLink   NVIDIA's datasheets give the total (both directions, all links) per GPU: V100 300 GB/s
           (NVLink 2), A100 600 GB/s (NVLink 3), H100 / H200 SXM 900 GB/s (NVLink 4), B200 1.8 TB/s
           (NVLink 5); the GeForce RTX 3090 bridge 112.5 GB/s. Per direction: half of that.
"""
from dataclasses import dataclass

__all__ = ["Link", "LINK_KINDS", "pcie_gb_per_s", "nvlink_gb_per_s", "link_between", "slowest_link", "add_links"]

LINK_KINDS = ("nvlink", "pcie_p2p", "pcie_host")
# Raw GB/s per lane and direction by PCIe generation (see the sources above).
PCIE_LANE_GB_PER_S = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
PCIE_EFFICIENCY = 0.8
HOST_PATH_FACTOR = 0.5
ASSUMED_PCIE = (4, 16)  # when a GPU does not report its link (no NVML): PCIe 4.0 x16, said as assumed
# NVLink GB/s per direction per GPU (all its links), by compute capability (see the sources above).
NVLINK_GB_PER_S = {(7, 0): 150.0, (8, 0): 300.0, (8, 6): 56.25, (9, 0): 450.0, (10, 0): 900.0}
ASSUMED_NVLINK_GB_PER_S = 150.0   # an NVLink of a GPU not in the table: the slowest datacenter figure


@dataclass(frozen=True)
class Link:
    """The path between two GPUs: kind (one of LINK_KINDS), estimated GB/s per direction, and words."""
    kind: str
    gb_per_s: float
    description: str
    assumed: bool = False   # True when the PCIe generation or width was not reported

    @property
    def bytes_per_s(self):
        return self.gb_per_s * 1e9


def pcie_gb_per_s(generation, width):
    """Effective GB/s per direction of a PCIe link; (rate, assumed) where assumed means the GPU did not
    report its link and PCIe 4.0 x16 is taken."""
    assumed = generation not in PCIE_LANE_GB_PER_S or not width
    generation, width = ASSUMED_PCIE if assumed else (generation, width)
    return PCIE_LANE_GB_PER_S[generation] * width * PCIE_EFFICIENCY, assumed


def _pcie_text(gpu):
    generation, width = gpu.get("pcie_generation"), gpu.get("pcie_width")
    if generation in PCIE_LANE_GB_PER_S and width:
        return f"PCIe Gen{generation} x{width}"
    return "PCIe (generation not reported: Gen4 x16 assumed)"


def nvlink_gb_per_s(compute_capability):
    """GB/s per direction of a GPU's NVLink, keyed by its compute capability (NVLINK_GB_PER_S): the
    SXM datasheet figure of that generation; ASSUMED_NVLINK_GB_PER_S for one not in the table. Parts
    of one compute capability with other NVLink (H800: 400 GB/s total; H100 NVL bridges: 600 GB/s
    total) get the table's figure all the same."""
    return NVLINK_GB_PER_S.get(tuple(compute_capability or ()), ASSUMED_NVLINK_GB_PER_S)


def _listed(gpu, key, other):
    values = gpu.get(key)
    return None if values is None else other["index"] in values


def link_between(a, b):
    """The Link from GPU dict `a` to GPU dict `b` (as get_gpu_info gives them), or None when the
    inventory says nothing about their peers (no 'peers' key: an injected inventory, say).

    NVLink when either lists the other in 'nvlink_peers'; peer access when NVML ('peers') or torch
    ('torch_peers', when asked) says so, except that torch's 'no' wins where torch was asked (CUDA
    itself refuses the direct copies then)."""
    if "peers" not in a and "torch_peers" not in a:
        return None
    torch_says = _listed(a, "torch_peers", b)
    rate_a, assumed_a = pcie_gb_per_s(a.get("pcie_generation"), a.get("pcie_width"))
    rate_b, assumed_b = pcie_gb_per_s(b.get("pcie_generation"), b.get("pcie_width"))
    slower = a if rate_a <= rate_b else b
    pcie, assumed = min(rate_a, rate_b), assumed_a or assumed_b
    if (_listed(a, "nvlink_peers", b) or _listed(b, "nvlink_peers", a)) and torch_says is not False:
        rate = min(nvlink_gb_per_s(a.get("compute_capability")), nvlink_gb_per_s(b.get("compute_capability")))
        return Link("nvlink", rate, f"NVLink (about {rate:.0f} GB/s per direction)")
    if torch_says or (torch_says is None and _listed(a, "peers", b)):
        return Link("pcie_p2p", pcie, f"{_pcie_text(slower)} with peer access (about {pcie:.0f} GB/s per direction)",
                    assumed)
    rate = pcie * HOST_PATH_FACTOR
    return Link("pcie_host", rate, f"{_pcie_text(slower)} without peer access, through host memory (about "
                                   f"{rate:.0f} GB/s per direction)", assumed)


def slowest_link(gpus):
    """The slowest Link between any two of `gpus`, or None for fewer than two GPUs or when the
    inventory says nothing about their links."""
    slowest = None
    for i, a in enumerate(gpus):
        for b in gpus[i + 1:]:
            found = [link for link in (link_between(a, b), link_between(b, a)) if link is not None]
            if not found:
                return None
            link = min(found, key=lambda item: item.gb_per_s)
            if slowest is None or link.gb_per_s < slowest.gb_per_s:
                slowest = link
    return slowest


def add_links(gpus):
    """Set each GPU's 'links': [{'to': torch index, 'kind': ..., 'gb_per_s': ...}] for every other GPU
    (JSON-ready; [] when the inventory says nothing)."""
    for gpu in gpus:
        gpu["links"] = []
        for other in gpus:
            link = None if other is gpu else link_between(gpu, other)
            if link is not None:
                gpu["links"].append(dict(to=other["index"], kind=link.kind, gb_per_s=round(link.gb_per_s, 1)))
    return gpus
