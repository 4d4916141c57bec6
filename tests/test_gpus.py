"""wanvideo.gpus on a CPU-only machine: a fake NVML and injected inventories."""
import ast
import json
import pathlib
import time

import pytest
import torch

from nvml_fake import GIB, FakeNVML, fake_gpu, fake_nvml, inventory  # noqa: F401 (fake_nvml is a fixture)
from wanvideo import gpus
from wanvideo.gpus import discovery

# --- discovery -----------------------------------------------------------------------------------

def test_get_gpu_info_reads_every_field_through_nvml(fake_nvml):
    inventory_ = gpus.get_gpu_info()
    assert [g["index"] for g in inventory_] == [0, 1, 2] and [g["nvml_index"] for g in inventory_] == [0, 1, 2]
    a6000 = inventory_[2]
    assert a6000["name"] == "NVIDIA RTX A6000" and a6000["uuid"].startswith("GPU-2222")
    assert a6000["total_memory"] == 48 * GIB and a6000["used_memory"] == GIB and a6000["free_memory"] == 47 * GIB
    assert (a6000["utilization"], a6000["temperature"], a6000["power"]) == (20, 32, 72.0)
    assert a6000["compute_capability"] == (9, 0) and (a6000["pcie_generation"], a6000["pcie_width"]) == (5, 16)
    assert a6000["pci_bus_id"] == "0000:1a:00.0" and a6000["source"] == "nvml"
    assert inventory_[0]["nvlink_peers"] == [1] and inventory_[0]["peers"] == [1, 2]
    assert inventory_[1]["peers"] == [0] and inventory_[2]["peers"] == [0] and inventory_[2]["nvlink_peers"] == []
    assert fake_nvml.sessions == 0  # every nvmlInit was shut down
    json.dumps(inventory_)


def test_fields_a_gpu_does_not_report_are_none(monkeypatch):
    nvml = FakeNVML([fake_gpu(0, unsupported=("power", "temp", "util", "pcie", "cc"))])
    monkeypatch.setattr(discovery, "_torch_identities", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (gpu,) = gpus.get_gpu_info(nvml)
    assert gpu["power"] is gpu["temperature"] is gpu["utilization"] is gpu["pcie_generation"] is None
    assert gpu["compute_capability"] is None and gpu["total_memory"] == 80 * GIB


def test_a_gpu_whose_memory_cannot_be_read_is_skipped(monkeypatch):
    nvml = FakeNVML([fake_gpu(0, unsupported=("memory",)), fake_gpu(1)])
    monkeypatch.setattr(discovery, "_torch_identities", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = gpus.get_gpu_info(nvml)
    assert [(g["index"], g["nvml_index"]) for g in found] == [(0, 1)]


@pytest.mark.parametrize("visible,expected_nvml", [
    ("2,0", [2, 0]),
    (" 1 , 2 ", [1, 2]),
    ("GPU-2222", [2]),                             # a unique UUID prefix
    ("GPU-1111aaaa-0000-1111-2222-333344445551,0", [1, 0]),
    ("1,7,0", [1]),                                # CUDA stops at the first invalid entry
    ("0,0,1", [0]),                                # ... and at a repeat
    ("GPU-9999", []),
    ("", []),
    ("-1", []),
])
def test_cuda_visible_devices_maps_torch_indices_to_nvml(fake_nvml, monkeypatch, visible, expected_nvml):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    found = gpus.get_gpu_info()
    assert [g["nvml_index"] for g in found] == expected_nvml
    assert [g["index"] for g in found] == list(range(len(expected_nvml)))


def test_peers_are_given_in_torch_indices(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1,0")  # torch 0 = NVML 2, torch 2 = NVML 0
    found = gpus.get_gpu_info()
    assert found[2]["nvml_index"] == 0 and found[2]["nvlink_peers"] == [1] and found[2]["peers"] == [0, 1]
    assert found[0]["peers"] == [2] and found[1]["peers"] == [2]


def test_initialised_cuda_is_matched_by_uuid_or_bus_id(fake_nvml, monkeypatch):
    """With CUDA up, torch's own device list decides (whatever CUDA_DEVICE_ORDER did)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # ignored: torch's identities win
    identities = [dict(uuid=fake_gpu(2)["uuid"], pci_bus_id=None), dict(uuid=None, pci_bus_id="0000:18:00.0")]
    monkeypatch.setattr(discovery, "_torch_identities", lambda: identities)
    found = gpus.get_gpu_info()
    assert [(g["index"], g["nvml_index"]) for g in found] == [(0, 2), (1, 0)]


def test_mixed_gpus_without_pci_bus_order_are_warned_about(fake_nvml, monkeypatch, caplog):
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    monkeypatch.setattr(discovery, "_warned", set())
    with caplog.at_level("WARNING", logger="wanvideo.gpus"):
        gpus.get_gpu_info()
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in caplog.text


def test_without_nvml_or_gpus_the_inventory_is_empty(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="wanvideo.gpus"):
        assert gpus.get_gpu_info(FakeNVML([fake_gpu(0)], fail_init=True)) == []
        monkeypatch.setattr(discovery, "_nvml", False)  # nvidia-ml-py not installed
        assert gpus.get_gpu_info() == []
    assert "No CUDA GPU found" in caplog.text


def test_get_available_gpus_counts_torch_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # a driver that counts GPUs CUDA cannot use
    assert gpus.get_available_gpus() == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpus.get_available_gpus() == [0, 1, 2]


# --- links (issue 13 item 3) --------------------------------------------------------------------

def test_links_are_classified_with_an_estimated_bandwidth(fake_nvml):
    """NVML 0-1 NVLink, 0-2 PCIe P2P, 1-2 nothing (through host memory); all Gen5 x16, H100-class."""
    by_index = {g["index"]: g for g in gpus.get_gpu_info()}
    nvlink = lambda to: dict(to=to, kind="nvlink", gb_per_s=450.0)
    assert by_index[0]["links"] == [nvlink(1), dict(to=2, kind="pcie_p2p", gb_per_s=50.4)]
    assert by_index[1]["links"] == [nvlink(0), dict(to=2, kind="pcie_host", gb_per_s=25.2)]
    assert by_index[2]["links"][1] == dict(to=1, kind="pcie_host", gb_per_s=25.2)
    assert all(g["torch_peers"] is None for g in by_index.values())  # CUDA not initialised: torch not asked


def test_an_idle_gpu_is_planned_at_its_maximum_pcie_link_not_its_current_one(monkeypatch):
    """Idle GPUs drop their link to Gen1: a Gen4 x16 card read at its current link would be planned
    at about 3 GB/s. The bandwidth uses the maximum (the lower of the GPU's and the slot's), the
    status table shows both."""
    nvml = FakeNVML([fake_gpu(0, gen=4, cur_gen=1, cur_width=16), fake_gpu(1, gen=4, cur_gen=1, cur_width=8),
                     fake_gpu(2, gen=4, gpu_max_gen=5), fake_gpu(3, unsupported=("pcie_max",), cur_gen=3)],
                    links={(0, 1): "p2p"})
    monkeypatch.setattr(discovery, "_torch_identities", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    by_index = {g["index"]: g for g in gpus.get_gpu_info(nvml)}
    assert (by_index[0]["pcie_generation"], by_index[0]["pcie_width"]) == (4, 16)
    assert (by_index[0]["pcie_current_generation"], by_index[0]["pcie_current_width"]) == (1, 16)
    assert by_index[0]["links"][0] == dict(to=1, kind="pcie_p2p", gb_per_s=25.2)   # Gen4 x16, not Gen1's 3.2
    assert by_index[2]["pcie_generation"] == 4    # a Gen5 GPU in a Gen4 slot: the slot's
    assert (by_index[3]["pcie_generation"], by_index[3]["pcie_width"]) == (3, 16)  # no maximum: the current link
    table = gpus.format_gpu_status(list(by_index.values())).splitlines()
    assert "Gen4 x16 (now Gen1 x16)" in table[1] and "Gen4 x16 (now Gen1 x8)" in table[2]
    assert "(now" not in table[4]


def test_torch_peer_access_is_asked_once_cuda_is_initialised(fake_nvml, monkeypatch):
    """torch's answer wins over NVML's: 0 -> 2 has NVML P2P but torch says no (host memory then);
    1 -> 2 has none in NVML but torch says yes."""
    allowed = {(0, 1), (1, 0), (1, 2), (2, 1)}
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: asked.append((a, b)) or (a, b) in allowed)
    by_index = {g["index"]: g for g in gpus.get_gpu_info()}
    assert asked and by_index[0]["torch_peers"] == [1] and by_index[1]["torch_peers"] == [0, 2]
    kinds = {(g["index"], link["to"]): link["kind"] for g in by_index.values() for link in g["links"]}
    assert kinds[(0, 2)] == "pcie_host" and kinds[(1, 2)] == "pcie_p2p" and kinds[(0, 1)] == "nvlink"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    asked.clear()
    assert gpus.get_gpu_info()[0]["torch_peers"] is None and not asked  # never initialises CUDA itself


def test_link_rates_follow_the_documented_table():
    from wanvideo.gpus import links
    assert links.pcie_gb_per_s(4, 16) == (pytest.approx(25.2, abs=0.05), False)
    assert links.pcie_gb_per_s(5, 16) == (pytest.approx(50.4, abs=0.05), False)
    assert links.pcie_gb_per_s(3, 8)[0] == pytest.approx(6.3, abs=0.05)
    assert links.pcie_gb_per_s(None, None) == (pytest.approx(25.2, abs=0.05), True)   # not reported: Gen4 x16
    assert links.nvlink_gb_per_s((9, 0)) == 450.0 and links.nvlink_gb_per_s((8, 0)) == 300.0
    a = dict(index=0, peers=[], pcie_generation=4, pcie_width=16)
    b = dict(index=1, peers=[], pcie_generation=5, pcie_width=8)
    link = links.link_between(a, b)
    assert link.kind == "pcie_host" and link.gb_per_s == pytest.approx(12.6, abs=0.05)  # half the slower link
    assert "without peer access" in link.description and "host memory" in link.description
    assert links.link_between(dict(a, peers=[1]), b).kind == "pcie_p2p"
    assert links.link_between(dict(a, nvlink_peers=[1], compute_capability=(9, 0)),
                              dict(b, compute_capability=(9, 0))).gb_per_s == 450.0
    assert links.link_between(dict(index=0), b) is None   # the inventory says nothing
    assert links.slowest_link([dict(a, peers=[1, 2]), dict(b, peers=[0]), dict(index=2, peers=[0])]).kind == "pcie_host"


# --- speed probe (issue 13 item 4) ---------------------------------------------------------------

def test_given_speeds_are_used_and_checked():
    from wanvideo.gpus import speed
    given = [dict(index=0, name="A", relative_speed=2.0), dict(index=1, name="B", relative_speed=1.0)]
    assert speed.relative_speeds(given) == ({0: 1.0, 1: 0.5}, "given")
    with pytest.raises(ValueError, match=r"GPU 1: relative_speed=-1 is not a positive number"):
        speed.relative_speeds([dict(index=0, relative_speed=1.0), dict(index=1, relative_speed=-1)])


def test_one_gpu_model_is_not_probed_and_a_cpu_only_machine_never_probes(monkeypatch):
    from wanvideo.gpus import speed
    def refuse(index):
        raise AssertionError("probed")
    same = [dict(index=0, name="RTX 4090"), dict(index=1, name="RTX 4090")]
    assert speed.relative_speeds(same, probe=refuse) == ({0: 1.0, 1: 1.0}, "same model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mixed = [dict(index=0, name="RTX 4090"), dict(index=1, name="RTX 3090")]
    assert speed.relative_speeds(mixed) == ({0: 1.0, 1: 1.0}, "not measured")


def test_mixed_gpus_are_probed_once_and_the_figures_cached(tmp_path):
    from wanvideo.gpus import speed
    speed.clear_speed_cache()
    cache = tmp_path / "speeds" / "gpu_speed.json"
    calls = []
    figures = {0: 160.0, 1: 80.0}
    probe = lambda index: calls.append(index) or figures[index]
    mixed = [dict(index=0, name="RTX 4090", uuid="GPU-a"), dict(index=1, name="RTX 3090", uuid="GPU-b")]
    assert speed.relative_speeds(mixed, probe=probe, cache_path=str(cache)) == ({0: 1.0, 1: 0.5}, "measured")
    assert sorted(calls) == [0, 1] and json.loads(cache.read_text()) == {"GPU-a": 160.0, "GPU-b": 80.0}
    assert speed.relative_speeds(mixed, probe=probe, cache_path=str(cache))[0] == {0: 1.0, 1: 0.5}
    assert len(calls) == 2                    # in memory
    speed.clear_speed_cache()                 # a new process: the file answers
    assert speed.relative_speeds(mixed, probe=probe, cache_path=str(cache))[0] == {0: 1.0, 1: 0.5}
    assert len(calls) == 2
    speed.clear_speed_cache()


def test_only_finite_positive_speeds_are_kept_from_the_cache_and_the_probe(tmp_path, caplog):
    """A cache holding 0.0 (or a negative, NaN, inf, a string) gave ZeroDivisionError or nonsense:
    such figures are dropped and the GPU probed again; a probe answering one of them leaves the
    speeds unmeasured."""
    from wanvideo.gpus import speed
    speed.clear_speed_cache()
    cache = tmp_path / "gpu_speed.json"
    cache.write_text('{"GPU-a": 0.0, "GPU-b": -3, "GPU-c": NaN, "GPU-d": Infinity, "GPU-e": "fast", "GPU-f": 50}')
    assert speed._read_cache(str(cache)) == {"GPU-f": 50.0}
    calls = []
    probe = lambda index: calls.append(index) or 100.0
    mixed = [dict(index=0, name="RTX 4090", uuid="GPU-a"), dict(index=1, name="RTX 3090", uuid="GPU-f")]
    assert speed.relative_speeds(mixed, probe=probe, cache_path=str(cache)) == ({0: 1.0, 1: 0.5}, "measured")
    assert calls == [0] and json.loads(cache.read_text())["GPU-a"] == 100.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        speed.clear_speed_cache()
        with caplog.at_level("WARNING", logger="wanvideo.gpus.speed"):
            assert speed.relative_speeds(mixed, probe=lambda index: bad, cache_path="") == (
                {0: 1.0, 1: 1.0}, "not measured")
        assert "Could not time GPU 0" in caplog.text
    speed.clear_speed_cache()


def test_only_gpus_of_this_machine_are_probed_and_the_cache_released(monkeypatch):
    """The default probe times cuda:N of this machine: only for inventory GPUs whose UUID is a local
    GPU's (at that GPU's local index), never for an inventory of another machine; afterwards the
    probe's cached blocks are handed back (torch.cuda.empty_cache)."""
    from wanvideo.gpus import speed
    speed.clear_speed_cache()
    timed, emptied = [], []
    monkeypatch.setattr(speed, "probe_tflops", lambda index: timed.append(index) or {3: 200.0, 5: 100.0}[index])
    monkeypatch.setattr(speed, "local_gpu_indices", lambda: {"GPU-a": 3, "GPU-b": 5})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    remote = [dict(index=0, name="RTX 4090", uuid="GPU-x"), dict(index=1, name="RTX 3090", uuid="GPU-y")]
    assert speed.relative_speeds(remote, cache_path="") == ({0: 1.0, 1: 1.0}, "not measured")
    assert timed == [] and emptied == []
    local = [dict(index=0, name="RTX 4090", uuid="GPU-a"), dict(index=1, name="RTX 3090", uuid="GPU-b")]
    assert speed.relative_speeds(local, cache_path="") == ({0: 1.0, 1: 0.5}, "measured")
    assert timed == [3, 5] and emptied == [True]
    speed.clear_speed_cache()


def test_the_speed_cache_file_follows_the_environment(monkeypatch, tmp_path):
    from wanvideo.gpus import speed
    monkeypatch.delenv("WANVIDEO_GPU_SPEED_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert speed.default_cache_path() == str(tmp_path / "wanvideo-multigpu" / "gpu_speed.json")
    monkeypatch.setenv("WANVIDEO_GPU_SPEED_CACHE", str(tmp_path / "mine.json"))
    assert speed.default_cache_path() == str(tmp_path / "mine.json")


# --- status table --------------------------------------------------------------------------------

def test_print_gpu_status_shows_one_row_per_gpu(fake_nvml, capsys):
    gpus.print_gpu_status()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["GPU", "Name"] and len(lines) == 4
    assert "1.0 / 80.0 GiB" in lines[1] and "Gen5 x16" in lines[1]
    assert "NVLink 1 (450 GB/s); P2P 2 (50 GB/s)" in lines[1]
    assert lines[0].split()[-1] == "Links" and "NVLink 0 (450 GB/s); host 2 (25 GB/s)" in lines[2]
    assert "RTX A6000" in lines[3] and "20%" in lines[3] and "32C" in lines[3] and "72 W" in lines[3]


def test_print_gpu_status_of_an_injected_inventory_and_of_none(capsys):
    gpus.print_gpu_status(inventory(20, 8))
    out = capsys.readouterr().out
    assert "RTX 1" in out and "16.0 / 24.0 GiB" in out and out.count("\n") == 3
    gpus.print_gpu_status([])
    assert "No CUDA GPU found" in capsys.readouterr().out


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ids,problem,fix", [
    ([0, 0], "listed twice", "list each GPU once"),
    ("1, 1", "listed twice", "list each GPU once"),
    ([-1], "negative", "numbered from 0"),
    ("0,-2", "negative", "numbered from 0"),
    ("0,a", "'a' is not a whole number", '"0,1"'),
    ([0, 1.5], "1.5 is not a whole number", "[0, 1]"),
    ([True], "True is not a whole number", "[0, 1]"),
    ("", "No GPU ids", '"0,1"'),
    ([], "empty", "[0, 1]"),
    (None, "No GPU ids", "[0, 1]"),
    ("0,,1", "empty entry", '"0,1"'),
    ([2], "GPU 2 does not exist", "Use those ids"),
    ("0,3,4", "GPUs 3, 4 do not exist", "CUDA_VISIBLE_DEVICES"),
])
def test_validate_names_the_problem_and_the_fix(ids, problem, fix):
    ok, message = gpus.validate_gpu_setup(ids, gpus=inventory(20, 20))
    assert not ok and problem in message and fix in message, message


def test_validate_rejects_small_and_busy_gpus():
    small = inventory(20, 3)
    ok, message = gpus.validate_gpu_setup("0,1", min_free_bytes=8 * GIB, gpus=small)
    assert not ok and "GPU 1" in message and "3.0 GiB free" in message and "8.0 GiB needed" in message
    assert "GPU 0" not in message and "choose another GPU" in message
    busy = inventory(20, 20, utilization=95)
    ok, message = gpus.validate_gpu_setup([0], max_utilization=50, gpus=busy)
    assert not ok and "95% busy" in message and "50%" in message and "wait" in message
    assert gpus.validate_gpu_setup([0], max_utilization=95, gpus=busy)[0]


def test_validate_without_gpus_says_so():
    ok, message = gpus.validate_gpu_setup([0], gpus=[])
    assert not ok and "no CUDA GPU" in message and "driver" in message


def test_validate_success_summarises_the_gpus():
    ok, message = gpus.validate_gpu_setup("1, 0", min_free_bytes=10 * GIB, max_utilization=50, gpus=inventory(20, 12))
    assert ok and message.startswith("2 GPUs ready") and "GPU 1 RTX 1, 12.0 GiB free of 24.0 GiB" in message


def test_validate_reads_the_inventory_itself(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert gpus.validate_gpu_setup([0])[0]
    ok, message = gpus.validate_gpu_setup([1])
    assert not ok and "sees 1 GPU (0)" in message and "'2'" in message


def test_validate_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="max_utilization=150"):
        gpus.validate_gpu_setup([0], max_utilization=150, gpus=inventory(20))


# --- monitoring ----------------------------------------------------------------------------------

class RampSampler:
    """Device 0 grows by 1 GiB per sample, device 1 stays at 2 GiB; utilisation known on 0 only."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {0: (self.calls * GIB, 10.0 * self.calls), 1: (2 * GIB, None)}


def test_monitor_reports_peak_mean_and_timeline(tmp_path):
    sampler = RampSampler()
    chart = tmp_path / "charts" / "memory.png"
    with gpus.monitor_memory_usage(interval=0.01, sampler=sampler, chart_path=str(chart)) as report:
        time.sleep(0.1)
    n = len(report.samples)
    assert n == sampler.calls >= 3 and report.devices == [0, 1] and report.source == "custom"
    assert report.peak_bytes == {0: n * GIB, 1: 2 * GIB}
    assert report.mean_bytes[0] == pytest.approx((n + 1) / 2 * GIB)
    assert report.peak_utilization == {0: 10.0 * n} and 1 not in report.mean_utilization
    times = [t for t, _, _ in report.timeline[0]]
    assert times == sorted(times) and times[-1] >= 0.09
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.chart_path == str(chart)
    assert "GPU 0: peak" in report.summary()
    json.dumps(report.to_dict())


def test_monitor_as_decorator_keeps_the_last_report():
    @gpus.monitor_memory_usage(interval=0.01, sampler=RampSampler(), devices=[0])
    def work(x):
        time.sleep(0.03)
        return x + 1

    assert work.last_report is None
    assert work(1) == 2
    assert work.last_report.devices == [0] and work.last_report.peak_bytes[0] >= 2 * GIB
    first = work.last_report
    work(2)
    assert work.last_report is not first


def test_bare_decorator_and_no_gpu(monkeypatch):
    monkeypatch.setattr(discovery, "_nvml", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    @gpus.monitor_memory_usage
    def work():
        return "done"

    assert work() == "done"
    report = work.last_report
    assert report.devices == [] and report.peak_bytes == {} and report.source == "none"
    assert report.summary() == "No GPU was monitored."


def test_monitor_reads_nvml_by_torch_index(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    fake_nvml.gpus[2]["used"] = 5 * GIB
    with gpus.monitor_memory_usage(interval=0.01, devices="0") as report:
        time.sleep(0.03)
    assert report.source == "nvml" and report.devices == [0]
    assert report.peak_bytes == {0: 5 * GIB} and report.peak_utilization == {0: 20}
    assert fake_nvml.sessions == 0


def test_monitor_rejects_a_gpu_that_does_not_exist(fake_nvml):
    with pytest.raises(ValueError, match="Cannot monitor GPU \\[5\\]"):
        with gpus.monitor_memory_usage(devices=[5]):
            pass
    assert fake_nvml.sessions == 0


def test_a_failing_sampler_stops_sampling_not_the_work(caplog):
    calls = []

    def sampler():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("GPU fell off the bus")
        return {0: (GIB, None)}

    with gpus.monitor_memory_usage(interval=0.005, sampler=sampler) as report:
        time.sleep(0.05)
    assert len(report.samples) == 2 and report.peak_bytes == {0: GIB}
    assert "GPU fell off the bus" in caplog.text


def test_monitor_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="interval=0"):
        gpus.monitor_memory_usage(interval=0)


# --- floors --------------------------------------------------------------------------------------

def test_the_gpus_package_imports_only_devices_and_libraries():
    """The GPU floor sits below the pipeline and the strategies: any other wanvideo import (or a
    top-level module of the pack) would be an import reaching up."""
    allowed_libraries = {"contextlib", "functools", "json", "logging", "math", "os", "re", "statistics", "sys",
                         "threading", "time",
                         "dataclasses", "typing", "torch", "pynvml", "matplotlib"}
    for path in pathlib.Path(gpus.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = "." * node.level + (node.module or "")
                assert node.level == 1 or target == "..devices", f"{path.name} imports {target}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    assert name.split(".")[0] in allowed_libraries, f"{path.name} imports {name}"
