import os
import socket

import pytest
import torch

from wanvideo.tiny import make_tiny_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))


def free_port():
    """A TCP port on the loopback interface that nothing listens on (for a process group's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(main, argv, capsys):
    """A command line's main(argv) -> (exit status, stdout, stderr), for argparse's errors
    (SystemExit) too."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{model_type: (path, config, state_dict)} for t2v, i2v and flf2v tiny models (official keys)."""
    folder = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny_checkpoint(folder / f"wan_tiny_{mt}.safetensors", mt, seed=i)
            for i, mt in enumerate(("t2v", "i2v", "flf2v"))}


@pytest.fixture(autouse=True)
def no_gpu_speed_probe(monkeypatch, tmp_path_factory):
    """No test times a real GPU or writes ~/.cache: the speed cache is a file of the test's own, and
    the matmul probe (wanvideo.gpus.speed.probe_tflops) answers 100 TFLOPS for every GPU without
    touching it. A test that wants other figures patches the probe itself."""
    from wanvideo.gpus import speed
    monkeypatch.setenv("WANVIDEO_GPU_SPEED_CACHE", str(tmp_path_factory.mktemp("speed") / "gpu_speed.json"))
    monkeypatch.setattr(speed, "probe_tflops", lambda index, *args, **kwargs: 100.0)
    speed.clear_speed_cache()
    yield
    speed.clear_speed_cache()
