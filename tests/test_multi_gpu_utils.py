"""multi_gpu_utils on a CPU-only machine: a fake NVML, injected inventories, the tiny model."""
import json
import time
from types import SimpleNamespace

import pytest
import torch

import multi_gpu_utils as mgu
from conftest import relative_error

GIB = 2**30


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """The pynvml functions multi_gpu_utils calls, answering for GPUs described by dicts.

    Each GPU: name, uuid, bus (NVML busId, 8-digit domain as NVML prints it), total, used, util,
    temp, power_mw, cc, gen, width; a key in `unsupported` makes that query raise like NVML does.
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
        return self._gpu(handle, "pcie")["gen"]

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):
        return self._gpu(handle, "pcie")["width"]

    def nvmlDeviceGetP2PStatus(self, handle_a, handle_b, caps_index):
        assert isinstance(caps_index, int)
        link = self.links.get((handle_a[1], handle_b[1])) or self.links.get((handle_b[1], handle_a[1]))
        if caps_index == 2:  # NVLink
            return 0 if link == "nvlink" else 1
        return 0 if link in ("nvlink", "p2p") else 1


def fake_gpu(i, name="NVIDIA H100 80GB HBM3", total_gib=80, used_gib=1, **extra):
    return dict(name=name, uuid=f"GPU-{i}{i}{i}{i}aaaa-0000-1111-2222-33334444555{i}", bus=f"00000000:{0x18 + i:02X}:00.0",
                total=int(total_gib * GIB), used=int(used_gib * GIB), util=10 * i, temp=30 + i, power_mw=70_000 + 1000 * i,
                cc=(9, 0), gen=5, width=16, **extra)


@pytest.fixture
def fake_nvml(monkeypatch):
    """Three GPUs (NVML 0 and 1 joined by NVLink, 2 reachable by PCIe P2P from 0), CUDA not initialised."""
    nvml = FakeNVML([fake_gpu(0), fake_gpu(1), fake_gpu(2, name="NVIDIA RTX A6000", total_gib=48)],
                    links={(0, 1): "nvlink", (0, 2): "p2p"})
    monkeypatch.setattr(mgu, "_nvml", nvml)
    monkeypatch.setattr(mgu, "_torch_identities", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return nvml


def inventory(*free_gib, total_gib=24, utilization=0):
    return [dict(index=i, name=f"RTX {i}", total_memory=total_gib * GIB, free_memory=int(f * GIB),
                 used_memory=int((total_gib - f) * GIB), utilization=utilization, peers=[])
            for i, f in enumerate(free_gib)]


# --- discovery -----------------------------------------------------------------------------------

def test_get_gpu_info_reads_every_field_through_nvml(fake_nvml):
    gpus = mgu.get_gpu_info()
    assert [g["index"] for g in gpus] == [0, 1, 2] and [g["nvml_index"] for g in gpus] == [0, 1, 2]
    a6000 = gpus[2]
    assert a6000["name"] == "NVIDIA RTX A6000" and a6000["uuid"].startswith("GPU-2222")
    assert a6000["total_memory"] == 48 * GIB and a6000["used_memory"] == GIB and a6000["free_memory"] == 47 * GIB
    assert (a6000["utilization"], a6000["temperature"], a6000["power"]) == (20, 32, 72.0)
    assert a6000["compute_capability"] == (9, 0) and (a6000["pcie_generation"], a6000["pcie_width"]) == (5, 16)
    assert a6000["pci_bus_id"] == "0000:1a:00.0" and a6000["source"] == "nvml"
    assert gpus[0]["nvlink_peers"] == [1] and gpus[0]["peers"] == [1, 2]
    assert gpus[1]["peers"] == [0] and gpus[2]["peers"] == [0] and gpus[2]["nvlink_peers"] == []
    assert fake_nvml.sessions == 0  # every nvmlInit was shut down
    json.dumps(gpus)


def test_fields_a_gpu_does_not_report_are_none(monkeypatch):
    nvml = FakeNVML([fake_gpu(0, unsupported=("power", "temp", "util", "pcie", "cc"))])
    monkeypatch.setattr(mgu, "_torch_identities", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (gpu,) = mgu.get_gpu_info(nvml)
    assert gpu["power"] is gpu["temperature"] is gpu["utilization"] is gpu["pcie_generation"] is None
    assert gpu["compute_capability"] is None and gpu["total_memory"] == 80 * GIB


def test_a_gpu_whose_memory_cannot_be_read_is_skipped(monkeypatch):
    nvml = FakeNVML([fake_gpu(0, unsupported=("memory",)), fake_gpu(1)])
    monkeypatch.setattr(mgu, "_torch_identities", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = mgu.get_gpu_info(nvml)
    assert [(g["index"], g["nvml_index"]) for g in gpus] == [(0, 1)]


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
    gpus = mgu.get_gpu_info()
    assert [g["nvml_index"] for g in gpus] == expected_nvml
    assert [g["index"] for g in gpus] == list(range(len(expected_nvml)))


def test_peers_are_given_in_torch_indices(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1,0")  # torch 0 = NVML 2, torch 2 = NVML 0
    gpus = mgu.get_gpu_info()
    assert gpus[2]["nvml_index"] == 0 and gpus[2]["nvlink_peers"] == [1] and gpus[2]["peers"] == [0, 1]
    assert gpus[0]["peers"] == [2] and gpus[1]["peers"] == [2]


def test_initialised_cuda_is_matched_by_uuid_or_bus_id(fake_nvml, monkeypatch):
    """With CUDA up, torch's own device list decides (whatever CUDA_DEVICE_ORDER did)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # ignored: torch's identities win
    identities = [dict(uuid=fake_gpu(2)["uuid"], pci_bus_id=None), dict(uuid=None, pci_bus_id="0000:18:00.0")]
    monkeypatch.setattr(mgu, "_torch_identities", lambda: identities)
    gpus = mgu.get_gpu_info()
    assert [(g["index"], g["nvml_index"]) for g in gpus] == [(0, 2), (1, 0)]


def test_mixed_gpus_without_pci_bus_order_are_warned_about(fake_nvml, monkeypatch, caplog):
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    monkeypatch.setattr(mgu, "_warned", set())
    with caplog.at_level("WARNING", logger="multi_gpu_utils"):
        mgu.get_gpu_info()
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in caplog.text


def test_without_nvml_or_gpus_the_inventory_is_empty(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="multi_gpu_utils"):
        assert mgu.get_gpu_info(FakeNVML([fake_gpu(0)], fail_init=True)) == []
        monkeypatch.setattr(mgu, "_nvml", False)  # nvidia-ml-py not installed
        assert mgu.get_gpu_info() == []
    assert "No CUDA GPU found" in caplog.text


# --- status table --------------------------------------------------------------------------------

def test_print_gpu_status_shows_one_row_per_gpu(fake_nvml, capsys):
    mgu.print_gpu_status()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["GPU", "Name"] and len(lines) == 4
    assert "1.0 / 80.0 GiB" in lines[1] and "NVLink 1; P2P 2" in lines[1] and "Gen5 x16" in lines[1]
    assert "RTX A6000" in lines[3] and "20%" in lines[3] and "32C" in lines[3] and "72 W" in lines[3]


def test_print_gpu_status_of_an_injected_inventory_and_of_none(capsys):
    mgu.print_gpu_status(inventory(20, 8))
    out = capsys.readouterr().out
    assert "RTX 1" in out and "16.0 / 24.0 GiB" in out and out.count("\n") == 3
    mgu.print_gpu_status([])
    assert "No CUDA GPU found" in capsys.readouterr().out


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[0, 1], "0,1", " 0 , 1 ", ("0", "1"), range(2)])
def test_parse_gpu_ids_accepts_lists_and_strings(ids):
    assert mgu.parse_gpu_ids(ids) == [0, 1]


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
    ok, message = mgu.validate_gpu_setup(ids, gpus=inventory(20, 20))
    assert not ok and problem in message and fix in message, message


def test_validate_rejects_small_and_busy_gpus():
    gpus = inventory(20, 3)
    ok, message = mgu.validate_gpu_setup("0,1", min_free_bytes=8 * GIB, gpus=gpus)
    assert not ok and "GPU 1" in message and "3.0 GiB free" in message and "8.0 GiB needed" in message
    assert "GPU 0" not in message and "choose another GPU" in message
    busy = inventory(20, 20, utilization=95)
    ok, message = mgu.validate_gpu_setup([0], max_utilization=50, gpus=busy)
    assert not ok and "95% busy" in message and "50%" in message and "wait" in message
    assert mgu.validate_gpu_setup([0], max_utilization=95, gpus=busy)[0]


def test_validate_without_gpus_says_so():
    ok, message = mgu.validate_gpu_setup([0], gpus=[])
    assert not ok and "no CUDA GPU" in message and "driver" in message


def test_validate_success_summarises_the_gpus():
    ok, message = mgu.validate_gpu_setup("1, 0", min_free_bytes=10 * GIB, max_utilization=50, gpus=inventory(20, 12))
    assert ok and message.startswith("2 GPUs ready") and "GPU 1 RTX 1, 12.0 GiB free of 24.0 GiB" in message


def test_validate_reads_the_inventory_itself(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert mgu.validate_gpu_setup([0])[0]
    ok, message = mgu.validate_gpu_setup([1])
    assert not ok and "sees 1 GPU (0)" in message and "'2'" in message


def test_validate_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="max_utilization=150"):
        mgu.validate_gpu_setup([0], max_utilization=150, gpus=inventory(20))


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
    with mgu.monitor_memory_usage(interval=0.01, sampler=sampler, chart_path=str(chart)) as report:
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
    @mgu.monitor_memory_usage(interval=0.01, sampler=RampSampler(), devices=[0])
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
    monkeypatch.setattr(mgu, "_nvml", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    @mgu.monitor_memory_usage
    def work():
        return "done"

    assert work() == "done"
    report = work.last_report
    assert report.devices == [] and report.peak_bytes == {} and report.source == "none"
    assert report.summary() == "No GPU was monitored."


def test_monitor_reads_nvml_by_torch_index(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    fake_nvml.gpus[2]["used"] = 5 * GIB
    with mgu.monitor_memory_usage(interval=0.01, devices="0") as report:
        time.sleep(0.03)
    assert report.source == "nvml" and report.devices == [0]
    assert report.peak_bytes == {0: 5 * GIB} and report.peak_utilization == {0: 20}
    assert fake_nvml.sessions == 0


def test_monitor_rejects_a_gpu_that_does_not_exist(fake_nvml):
    with pytest.raises(ValueError, match="Cannot monitor GPU \\[5\\]"):
        with mgu.monitor_memory_usage(devices=[5]):
            pass
    assert fake_nvml.sessions == 0


def test_a_failing_sampler_stops_sampling_not_the_work(caplog):
    calls = []

    def sampler():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("GPU fell off the bus")
        return {0: (GIB, None)}

    with mgu.monitor_memory_usage(interval=0.005, sampler=sampler) as report:
        time.sleep(0.05)
    assert len(report.samples) == 2 and report.peak_bytes == {0: GIB}
    assert "GPU fell off the bus" in caplog.text


def test_monitor_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="interval=0"):
        mgu.monitor_memory_usage(interval=0)


# --- automatic configuration ---------------------------------------------------------------------

def test_setup_optimal_parallelism_reads_the_header(tiny_checkpoints, caplog):
    path = str(tiny_checkpoints["t2v"][0])
    with caplog.at_level("INFO", logger="multi_gpu_utils"):
        config = mgu.setup_optimal_parallelism(path, gpus=inventory(20, 20), width=64, height=64, num_frames=5)
    assert config["parallelism_type"] == "data_parallel" and config["gpu_ids"] == [0, 1]
    assert "data_parallel" in caplog.text
    from wanvideo import inspect_checkpoint
    from_info = mgu.get_optimal_gpu_config(inspect_checkpoint(path), gpus=inventory(20, 20), width=64, height=64,
                                           num_frames=5)
    assert from_info == config


def test_get_optimal_gpu_config_reads_the_inventory_itself(tiny_checkpoints, fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    config = mgu.get_optimal_gpu_config(tiny_checkpoints["t2v"][0], cfg=False)
    assert config["parallelism_type"] == "none" and config["gpu_ids"] == [0]


# --- benchmark -----------------------------------------------------------------------------------

SMALL = dict(width=64, height=48, num_frames=5, base_precision="fp32")


def test_benchmark_on_cpu_compares_strategies_on_the_same_inputs(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["t2v"][0]
    table = mgu.benchmark_multi_gpu_performance(path, configs=["single_device", {"strategy": "block_swap",
                                                "name": "swap 3", "blocks_to_swap": 3}], steps=2,
                                                devices="cpu", output_dir=tmp_path, **SMALL)
    single, swap = table
    assert single["status"] == swap["status"] == "ok", table
    assert single["speedup_vs_single"] == 1.0 and single["relative_error_vs_single"] == 0.0
    assert swap["config"] == "swap 3" and swap["settings"]["blocks_to_swap"] == 3
    assert swap["relative_error_vs_single"] <= 1e-5
    assert len(single["step_seconds"]) == 2 and single["seconds_per_step"] > 0
    assert single["peak_memory_per_gpu"] == {}  # CPU: no GPU memory
    saved = json.loads((tmp_path / "benchmark_results.json").read_text())
    assert [r["config"] for r in saved["results"]] == ["single_device", "swap 3"] and "t2v" in saved["model"]
    assert (tmp_path / "benchmark_chart.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_output_equals_a_plain_forward(tiny_checkpoints, monkeypatch):
    """What the benchmark runs is the model's forward on its inputs: check the last step against one."""
    from wanvideo import load_wan_model
    path = tiny_checkpoints["i2v"][0]
    captured = {}

    def capture(model_path, devices, settings):
        model = load_wan_model(model_path, "cpu", "fp32")

        def step(inputs):
            captured["inputs"], captured["output"] = inputs, model(**inputs)
            return captured["output"]
        return mgu.BenchmarkRunnable(step, devices[:1])

    monkeypatch.setitem(mgu.BENCHMARK_STRATEGIES, "capture", mgu.BenchmarkStrategy(capture))
    (row,) = mgu.benchmark_multi_gpu_performance(path, configs=["capture"], steps=1, devices="cpu", **SMALL)
    assert row["status"] == "ok"
    inputs = captured["inputs"]
    assert len(inputs["x"]) == 2 and inputs["clip_fea"].shape == (2, 257, 1280)  # cond + uncond, i2v extras
    assert torch.equal(inputs["x"][0], inputs["x"][1]) and not torch.equal(inputs["context"][0], inputs["context"][1])
    reference = load_wan_model(path, "cpu", "fp32")(**inputs)
    assert relative_error(captured["output"][0], reference[0]) <= 1e-5


def test_strategies_register_and_fail_or_skip_cleanly(tiny_checkpoints, monkeypatch):
    def missing(model_path, devices, settings):
        import wanvideo.parallel.not_written_yet  # noqa: F401

    def broken(model_path, devices, settings):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(mgu, "BENCHMARK_STRATEGIES", dict(mgu.BENCHMARK_STRATEGIES))
    mgu.register_benchmark_strategy("missing", missing)
    mgu.register_benchmark_strategy("broken", broken)
    mgu.register_benchmark_strategy("two_gpus", min_devices=2)(broken)
    table = mgu.benchmark_multi_gpu_performance(tiny_checkpoints["t2v"][0], configs=["missing", "broken", "two_gpus"],
                                                steps=1, devices="cpu", **SMALL)
    status = {r["config"]: (r["status"], r["note"]) for r in table}
    assert status["missing"][0] == "skipped" and "not_written_yet" in status["missing"][1]
    assert status["broken"] == ("failed", "RuntimeError: out of cheese")
    assert status["two_gpus"][0] == "skipped" and "needs 2 devices" in status["two_gpus"][1]
    assert all(r["speedup_vs_single"] is None for r in table)


def test_benchmark_rejects_unknown_strategies_and_absent_gpus(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["t2v"][0]
    with pytest.raises(ValueError, match="'warp_drive'.*single_device"):
        mgu.benchmark_multi_gpu_performance(path, configs=["warp_drive"], devices="cpu", **SMALL)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="devices='cpu'"):
        mgu.benchmark_multi_gpu_performance(path, devices="0,1", **SMALL)


# --- command line --------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["status"], ["validate"], ["recommend"], ["benchmark"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mgu.main(command + ["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_cli_status_validate_recommend(fake_nvml, tiny_checkpoints, capsys):
    assert mgu.main(["status"]) == 0
    assert "RTX A6000" in capsys.readouterr().out
    assert mgu.main(["status", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert mgu.main(["validate", "0,1", "--min-free-gib", "10"]) == 0
    assert capsys.readouterr().out.startswith("OK: 2 GPUs ready")
    assert mgu.main(["validate", "0,5"]) == 1
    assert "GPU 5 does not exist" in capsys.readouterr().out
    path = str(tiny_checkpoints["t2v"][0])
    assert mgu.main(["recommend", path, "--width", "64", "--height", "64", "--frames", "5", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["parallelism_type"] == "data_parallel" and config["base_precision"] == "bf16"
    assert mgu.main(["recommend", path, "--no-cfg", "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "parallelism_type" in out and "fp16" in out


def test_cli_benchmark_on_cpu(tiny_checkpoints, tmp_path, capsys):
    code = mgu.main(["benchmark", str(tiny_checkpoints["t2v"][0]), "--devices", "cpu", "--steps", "1",
                     "--warmup-steps", "0", "--width", "64", "--height", "48", "--frames", "5", "--precision", "fp32",
                     "--configs", "single_device", "--output-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "single_device" in out and "1.00x" in out
    assert (tmp_path / "benchmark_results.json").exists()
