"""A fake NVML and GPU inventories for the GPU tests (test_gpus.py, test_multi_gpu_utils.py)."""
from types import SimpleNamespace

import pytest

from wanvideo.gpus import discovery

GIB = 2**30


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """The pynvml functions wanvideo.gpus calls, answering for GPUs described by dicts.

    Each GPU: name, uuid, bus (NVML busId, 8-digit domain as NVML prints it), total, used, util,
    temp, power_mw, cc, gen, width (the PCIe link's maximum: the GPU with its slot), and optionally
    gpu_max_gen (the GPU alone; default gen), cur_gen, cur_width (the link now; default gen, width:
    idle GPUs drop to Gen1); a key in `unsupported` makes that query raise like NVML does ('pcie':
    every link query, 'pcie_max': the maximum ones only).
    links: {(a, b): 'nvlink' | 'p2p'} in NVML numbering, symmetric.
    """
    NVMLError = FakeNVMLError

    def __init__(self, gpus, links=None, fail_init=False):
        self.gpus, self.links, self.fail_init = gpus, links or {}, fail_init
        self.sessions = 0
        self.memory_reads = 0

    def nvmlInit(self):
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")
        self.sessions += 1

    def nvmlShutdown(self):
        self.sessions -= 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        assert self.sessions > 0, "NVML used outside nvmlInit/nvmlShutdown"
        return ("handle", index)

    def _gpu(self, handle, field):
        gpu = self.gpus[handle[1]]
        if field in gpu.get("unsupported", ()):
            raise FakeNVMLError("Not Supported")
        return gpu

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle, "name")["name"].encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle, "uuid")["uuid"]

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=self._gpu(handle, "bus")["bus"].encode())

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._gpu(handle, "memory")
        self.memory_reads += 1
        return SimpleNamespace(total=gpu["total"], used=gpu["used"], free=gpu["total"] - gpu["used"])

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self._gpu(handle, "util")["util"], memory=0)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == 0
        return self._gpu(handle, "temp")["temp"]

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._gpu(handle, "power")["power_mw"]

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return self._gpu(handle, "cc")["cc"]

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle):
        gpu = self._gpu(handle, "pcie")
        return gpu.get("cur_gen", gpu["gen"])

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):
        gpu = self._gpu(handle, "pcie")
        return gpu.get("cur_width", gpu["width"])

    def _max_link(self, handle):
        self._gpu(handle, "pcie_max")
        return self._gpu(handle, "pcie")

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle):  # the GPU with this system (its slot)
        return self._max_link(handle)["gen"]

    def nvmlDeviceGetGpuMaxPcieLinkGeneration(self, handle):  # the GPU alone
        gpu = self._max_link(handle)
        return gpu.get("gpu_max_gen", gpu["gen"])

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle):
        return self._max_link(handle)["width"]

    def nvmlDeviceGetP2PStatus(self, handle_a, handle_b, caps_index):
        assert isinstance(caps_index, int)
        link = self.links.get((handle_a[1], handle_b[1])) or self.links.get((handle_b[1], handle_a[1]))
        if caps_index == 2:  # NVLink
            return 0 if link == "nvlink" else 1
        return 0 if link in ("nvlink", "p2p") else 1


def fake_gpu(i, name="NVIDIA H100 80GB HBM3", total_gib=80, used_gib=1, gen=5, width=16, **extra):
    return dict(name=name, uuid=f"GPU-{i}{i}{i}{i}aaaa-0000-1111-2222-33334444555{i}", bus=f"00000000:{0x18 + i:02X}:00.0",
                total=int(total_gib * GIB), used=int(used_gib * GIB), util=10 * i, temp=30 + i, power_mw=70_000 + 1000 * i,
                cc=(9, 0), gen=gen, width=width, **extra)


@pytest.fixture
def fake_nvml(monkeypatch):
    """Three GPUs (NVML 0 and 1 joined by NVLink, 2 reachable by PCIe P2P from 0), CUDA not initialised."""
    nvml = FakeNVML([fake_gpu(0), fake_gpu(1), fake_gpu(2, name="NVIDIA RTX A6000", total_gib=48)],
                    links={(0, 1): "nvlink", (0, 2): "p2p"})
    monkeypatch.setattr(discovery, "_nvml", nvml)
    monkeypatch.setattr(discovery, "_torch_identities", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return nvml


def inventory(*free_gib, total_gib=24, utilization=0):
    return [dict(index=i, name=f"RTX {i}", total_memory=total_gib * GIB, free_memory=int(f * GIB),
                 used_memory=int((total_gib - f) * GIB), utilization=utilization, peers=[])
            for i, f in enumerate(free_gib)]
