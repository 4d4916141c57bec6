"""multi_gpu_utils, the documented face: its names, the plan front, and the command line (CPU only)."""
import json

import pytest
import torch

import multi_gpu_utils as mgu
from conftest import run_main
from nvml_fake import fake_nvml, inventory  # noqa: F401 (fake_nvml is a fixture)


# --- the documented names ------------------------------------------------------------------------

def test_the_documented_names_are_the_package_objects():
    import wanvideo.benchmark
    import wanvideo.devices
    import wanvideo.gpus
    import wanvideo.parallel.auto
    homes = {"parse_gpu_ids": wanvideo.devices, "get_optimal_gpu_config": wanvideo.parallel.auto,
             "setup_optimal_parallelism": wanvideo.parallel.auto, "validate_model_setup": wanvideo.parallel.auto}
    homes.update({name: wanvideo.gpus for name in ("get_gpu_info", "get_available_gpus", "format_gpu_status",
                                                   "print_gpu_status", "validate_gpu_setup", "monitor_memory_usage",
                                                   "MemoryUsageReport")})
    homes.update({name: wanvideo.benchmark for name in ("benchmark_multi_gpu_performance", "BENCHMARK_STRATEGIES",
                                                        "register_benchmark_strategy", "BenchmarkSettings",
                                                        "BenchmarkRunnable")})
    assert set(mgu.__all__) == set(homes) | {"main"}
    for name, home in homes.items():
        assert getattr(mgu, name) is getattr(home, name), name


@pytest.mark.parametrize("ids", [[0, 1], "0,1", " 0 , 1 ", ("0", "1"), range(2)])
def test_parse_gpu_ids_accepts_lists_and_strings(ids):
    assert mgu.parse_gpu_ids(ids) == [0, 1]


# --- automatic configuration ---------------------------------------------------------------------

def test_setup_optimal_parallelism_reads_the_header(tiny_checkpoints, caplog):
    path = str(tiny_checkpoints["t2v"][0])
    with caplog.at_level("INFO", logger="wanvideo.parallel.auto"):
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


# --- Wan 2.2: the A14B expert pair and the TI2V-5B (issue 12 item 5) --------------------------------

A14B = dict(model_type="t2v", in_dim=16, out_dim=16, text_dim=4096, freq_dim=256, dim=5120, ffn_dim=13824,
            num_heads=40, num_layers=40)
TI2V_5B = dict(model_type="ti2v", in_dim=48, out_dim=48, text_dim=4096, freq_dim=256, dim=3072, ffn_dim=14336,
               num_heads=24, num_layers=30)


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    """Header-only files of the real Wan 2.2 sizes, named as ComfyUI's repackaged files are."""
    from wanvideo.tiny import make_header_only_checkpoint
    folder = tmp_path_factory.mktemp("wan22")
    return {name: str(make_header_only_checkpoint(folder / f"{name}.safetensors", config)) for name, config in (
        ("wan2.2_t2v_high_noise_14B_bf16", A14B), ("wan2.2_t2v_low_noise_14B_bf16", A14B),
        ("wan2.2_ti2v_5B_fp16", TI2V_5B))}


def test_recommend_plans_the_expert_pair(wan22, fake_nvml, monkeypatch, capsys):
    """Through the CLI on the fake machine: two 80 GB GPUs hold both experts (53 GiB) each, so the
    pair runs as two worker groups over both; an 80 GB and a 48 GB GPU do not, so each expert gets
    its own GPU (the experts' own 'auto', experts.pair_placement)."""
    high, low = wan22["wan2.2_t2v_high_noise_14B_bf16"], wan22["wan2.2_t2v_low_noise_14B_bf16"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert mgu.main(["recommend", high, "--low-noise-model", low, "--json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["parallelism_type"] == "distributed" and config["gpu_ids"] == [0, 1]
    assert config["reason"].startswith("Wan 2.2 T2V A14B high-noise + low-noise experts, placed distributed")
    assert config["low_noise_model"] == low and set(config["experts"]) == {"high_noise", "low_noise"}
    assert config["cfg_degree"] == 2 and "NVLink" in config["reason"]
    assert config["estimated_memory_per_gpu"][0] > 2 * 26 * 2**30  # both experts on every GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert mgu.main(["recommend", high, "--low-noise-model", low]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["parallelism_type", "expert_parallel"]
    assert "high-noise expert:" in out and "low-noise expert:" in out
    assert "each expert on its half of the GPUs" in out


def test_the_pair_plan_places_each_expert_by_the_planner(wan22):
    high, low = wan22["wan2.2_t2v_high_noise_14B_bf16"], wan22["wan2.2_t2v_low_noise_14B_bf16"]
    two = mgu.get_optimal_gpu_config(high, gpus=inventory(24, 24), low_noise_model=low)
    assert two["parallelism_type"] == "expert_parallel" and two["gpu_ids"] == [0, 1]
    assert two["experts"]["high_noise"]["gpu_ids"] == [0] and two["experts"]["low_noise"]["gpu_ids"] == [1]
    assert two["experts"]["high_noise"]["blocks_to_swap"] > 0   # a 14B expert on 24 GB swaps blocks
    one = mgu.get_optimal_gpu_config(high, gpus=inventory(24), low_noise_model=low)
    assert one["parallelism_type"] == "none" and "idle expert rests in pinned host memory" in one["reason"]
    with pytest.raises(ValueError, match="look swapped"):
        mgu.get_optimal_gpu_config(low, gpus=inventory(24), low_noise_model=high)
    with pytest.raises(ValueError, match="are not two experts of one model"):
        mgu.get_optimal_gpu_config(high, gpus=inventory(24), low_noise_model=wan22["wan2.2_ti2v_5B_fp16"])


def test_recommend_sizes_the_5b_with_its_own_vae(wan22, fake_nvml, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    argv = ["recommend", wan22["wan2.2_ti2v_5B_fp16"], "--width", "1280", "--height", "704", "--frames", "121",
            "--json"]
    assert mgu.main(argv) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["reason"].startswith("Wan 2.2 TI2V 5B in bf16")
    assert "27280 tokens (1280x704, 121 frames)" in config["reason"]


def test_validate_checks_a_model_or_a_pair_on_the_given_gpus(wan22, fake_nvml, capsys):
    high, low = wan22["wan2.2_t2v_high_noise_14B_bf16"], wan22["wan2.2_t2v_low_noise_14B_bf16"]
    assert mgu.main(["validate", "0", "--model", high, "--low-noise-model", low]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 1 GPU ready") and "Wan 2.2 T2V A14B high-noise + low-noise experts" in out
    code, _, err = run_cli(["validate", "0", "--model", low, "--low-noise-model", high], capsys)
    assert_one_line_error(code, err, "look swapped")
    code, _, err = run_cli(["validate", "0", "--low-noise-model", low], capsys)
    assert_one_line_error(code, err, "--low-noise-model needs --model")
    ok, message = mgu.validate_model_setup([0], high, gpus=inventory(8), width=1280, height=720)
    assert not ok and "does not fit: GPU 0" in message and "fp8" in message


def test_a_pair_plan_that_says_it_fits_passes_validation(tmp_path):
    """pair_placement compares both experts, the activations and the runtime reserve with the
    planner's usable memory (not raw free memory), so the pair's 'distributed' plan never overfills a
    GPU that validate_model_setup then refuses: on two 0.7 GiB GPUs the tiny pair fits raw free
    memory but not with the 1 GiB runtime reserve."""
    from wanvideo.tiny import make_tiny_expert_pair
    pair = make_tiny_expert_pair(tmp_path)
    high, low = str(pair["high_noise"][0]), str(pair["low_noise"][0])
    workload = dict(width=64, height=64, num_frames=5)
    small = mgu.get_optimal_gpu_config(high, gpus=inventory(0.7, 0.7, total_gib=0.7), low_noise_model=low,
                                       **workload)
    assert small["parallelism_type"] == "expert_parallel" and "do not fit GPU 0" in small["reason"]
    for size in (0.7, 1.1, 1.2, 1.5, 2, 4):
        gpus = inventory(size, size, total_gib=size)
        config = mgu.get_optimal_gpu_config(high, gpus=gpus, low_noise_model=low, **workload)
        ok, message = mgu.validate_model_setup("0,1", high, low_noise_model=low, gpus=gpus, **workload)
        if config["parallelism_type"] == "distributed":
            assert ok, (size, message)
    assert config["parallelism_type"] == "distributed"   # 4 GiB cards hold both tiny experts


@pytest.mark.parametrize("asked,fragment", [(dict(block_swap=True), "block swap"),
                                            (dict(torch_compile=True), "torch.compile"),
                                            (dict(no_nccl=True), "no NCCL")])
def test_auto_for_a_pair_needs_worker_processes_for_distributed(wan22, monkeypatch, asked, fragment):
    """Both experts fit two 80 GB GPUs, but with block swap, torch.compile or no NCCL (Windows) the
    distributed loader refuses: auto places the pair expert_parallel, in the planner (plan_pair)
    and in the loader (experts._plan_pair), by the one rule (experts.pair_placement)."""
    import torch.distributed
    from wanvideo import inspect_checkpoint
    from wanvideo.engine.block_swap import BlockSwapSettings
    from wanvideo.parallel import experts
    from wanvideo.pipeline import LoadSettings
    high, low = wan22["wan2.2_t2v_high_noise_14B_bf16"], wan22["wan2.2_t2v_low_noise_14B_bf16"]
    assert mgu.get_optimal_gpu_config(high, gpus=inventory(80, 80, total_gib=80),
                                      low_noise_model=low)["parallelism_type"] == "distributed"
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    # 79 of 80 GiB free on each (cuda:1 need not exist: the GPU machine has one)
    monkeypatch.setattr(experts, "free_and_total_bytes", lambda device: (79 * 2**30, 80 * 2**30))
    info = inspect_checkpoint(high)
    assert experts._plan_pair(devices, info, LoadSettings(), {})[0] == "distributed"
    if asked.pop("no_nccl", False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    config = mgu.get_optimal_gpu_config(high, gpus=inventory(80, 80, total_gib=80), low_noise_model=low, **asked)
    assert config["parallelism_type"] == "expert_parallel" and fragment in config["reason"]
    settings = LoadSettings(block_swap=BlockSwapSettings(blocks_to_swap=10) if asked.get("block_swap") else None,
                            compile_args={} if asked.get("torch_compile") else None)
    placement, why = experts._plan_pair(devices, info, settings, {})
    assert placement == "expert_parallel" and fragment in why


def test_sizes_follow_the_checkpoints_vae(wan22, tiny_checkpoints, fake_nvml, monkeypatch, capsys):
    """The TI2V-5B's Wan 2.2 VAE needs multiples of 32: 1280x720 is refused for it in one line
    (naming the value), accepted for a Wan 2.1 model; the help says so."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    five_b = wan22["wan2.2_ti2v_5B_fp16"]
    for command in (["recommend", five_b], ["validate", "0", "--model", five_b]):
        code, out, err = run_cli([*command, "--width", "1280", "--height", "720"], capsys)
        assert_one_line_error(code, err, "height=720", "multiple of 32")
    assert mgu.main(["recommend", str(tiny_checkpoints["t2v"][0]), "--width", "1280", "--height", "720"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        mgu.main(["recommend", "--help"])
    assert "of 32 for the Wan 2.2 TI2V-5B" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv", [["--width", "1280"], ["--frames", "33"], ["--precision", "fp16"], ["--no-cfg"],
                                  ["--quantization", "fp8_e4m3fn", "--batch-size", "2"]])
def test_validate_refuses_workload_options_without_a_model(argv, fake_nvml, capsys):
    """They size the model's plan; without --model they were silently ignored."""
    code, out, err = run_cli(["validate", "0,1", *argv], capsys)
    assert_one_line_error(code, err, argv[0], "need", "--model")
    assert out == ""


# --- errors: one line on stderr, exit status 2 (issue 14, item 11) -------------------------------

def run_cli(argv, capsys):
    return run_main(mgu.main, argv, capsys)


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("multi_gpu_utils.py") and "error: " in err, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def files(tmp_path, tiny_checkpoints):
    """A model, a folder, a text file and a pickle checkpoint."""
    text = tmp_path / "notes.txt"
    text.write_text("not a model, but long enough to have a header length")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"PK\x03\x04" + bytes(64))
    return dict(model=str(tiny_checkpoints["t2v"][0]), folder=str(tmp_path), text=str(text), pickle=str(pickle),
                missing=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("command", ["recommend", "benchmark"])
@pytest.mark.parametrize("which,fragment", [
    ("missing", "missing.safetensors"),
    ("folder", "is a folder"),
    ("text", "notes.txt"),
    ("pickle", "pickle"),
])
def test_a_bad_model_file_is_one_line(command, which, fragment, files, capsys):
    extra = ["--devices", "cpu"] if command == "benchmark" else []
    code, _, err = run_cli([command, files[which], *extra], capsys)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("devices,fragment", [
    ("a,b", "'a' is not a device"),
    ("cuda:3", "CUDA is not available here"),
    ("0,-1", "-1"),
    (",", "not a device"),
])
def test_bad_devices_are_one_line(devices, fragment, files, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only build
    code, _, err = run_cli(["benchmark", files["model"], "--devices", devices], capsys)
    assert_one_line_error(code, err, fragment)
    assert "Torch not compiled with CUDA" not in err


def test_an_output_dir_that_is_a_file_is_one_line(files, capsys):
    code, out, err = run_cli(["benchmark", files["model"], "--devices", "cpu", "--output-dir", files["text"]], capsys)
    assert_one_line_error(code, err, "notes.txt' is a file")
    assert "[1/" not in out  # refused before the first configuration started


SIZE_ERRORS = [
    (["--width", "0"], ("--width", "0 is too small")),
    (["--height", "-48"], ("--height", "-48 is too small")),
    (["--frames", "0"], ("--frames", "0 is too small")),
    (["--batch-size", "0"], ("--batch-size", "0 is too small")),
    (["--width", "wide"], ("--width", "'wide' is not a whole number")),
    (["--width", "65"], ("width=65", "multiple of 16")),
    (["--frames", "10"], ("num_frames=10", "4n + 1")),
]
COUNT_ERRORS = [
    (["--steps", "0"], ("--steps", "0 is too small")),
    (["--warmup-steps", "-1"], ("--warmup-steps", "-1 is too small")),
    (["--blocks-to-swap", "-3"], ("--blocks-to-swap", "-3 is too small")),
]


@pytest.mark.parametrize("command,argv,fragments", [("recommend", *case) for case in SIZE_ERRORS]
                         + [("benchmark", *case) for case in SIZE_ERRORS + COUNT_ERRORS])
def test_bad_sizes_and_counts_are_one_line(command, argv, fragments, files, capsys):
    code, out, err = run_cli([command, files["model"], *argv], capsys)
    assert_one_line_error(code, err, *fragments)
    assert out == ""


def test_an_unknown_config_lists_the_registered_ones(files, capsys):
    code, out, err = run_cli(["benchmark", files["model"], "--devices", "cpu", "--configs", "single_device,warp"],
                             capsys)
    assert_one_line_error(code, err, "'warp'", "registered: single_device, block_swap, data_parallel, "
                                               "block_distribution")
    assert "[1/" not in out


def test_debug_shows_the_traceback_and_unexpected_errors_name_their_type(files, capsys, monkeypatch):
    from wanvideo.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        mgu.main(["--debug", "recommend", files["missing"]])
    with pytest.raises(CheckpointError):
        mgu.main(["recommend", files["missing"], "--debug"])  # after the command too
    monkeypatch.setattr(mgu, "get_gpu_info", lambda: (_ for _ in ()).throw(RuntimeError("NVML\nexploded")))
    code, _, err = run_cli(["-v", "status"], capsys)
    assert_one_line_error(code, err, "RuntimeError: NVML exploded", "--debug")


# --- benchmark progress and CPU defaults (issue 14, item 12) -------------------------------------

def test_cli_benchmark_prints_progress_and_says_it_chose_a_cpu_workload(files, capsys):
    code, out, err = run_cli(["benchmark", files["model"], "--devices", "cpu", "--steps", "1", "--configs",
                              "single_device,block_swap"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("CPU only: a small workload where not given (64x48, 5 frames, fp32)")
    assert lines[1].startswith("[1/2] single_device: running 1 warm-up + 1 timed steps, 64x48, 5 frames, fp32")
    assert lines[2].startswith("[1/2] single_device: ok on cpu, ") and " s/step (" in lines[2]
    assert lines[3].startswith("[2/2] block_swap: running") and lines[4].startswith("[2/2] block_swap: ok on cpu")
    assert lines[5].split()[:2] == ["config", "status"]  # then the table


def test_cli_benchmark_keeps_what_the_user_gave(files, capsys):
    code, out, _ = run_cli(["benchmark", files["model"], "--devices", "cpu", "--steps", "1", "--warmup-steps", "0",
                            "--configs", "single_device", "--width", "32", "--height", "32", "--frames", "1",
                            "--precision", "fp32"], capsys)
    assert code == 0 and "CPU only" not in out
    assert "32x32, 1 frames, fp32" in out.splitlines()[0]


def test_a_failing_configuration_is_a_row_and_a_line_not_a_traceback(files, capsys, monkeypatch):
    from wanvideo import benchmark as bench

    def broken(model_path, devices, settings):
        raise RuntimeError("out of cheese")

    monkeypatch.setitem(bench.BENCHMARK_STRATEGIES, "broken", bench.BenchmarkStrategy(broken))
    code, out, err = run_cli(["benchmark", files["model"], "--devices", "cpu", "--configs", "broken"], capsys)
    assert code == 1 and "Traceback" not in out + err
    assert "[1/1] broken: failed: RuntimeError: out of cheese" in out.splitlines()
