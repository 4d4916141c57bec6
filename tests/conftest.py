import contextlib
import os

import pytest
import torch

from wanvideo.parallel.distributed.workers import free_port  # noqa: F401 (the tests' import of it)
from wanvideo.tiny import make_tiny_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_main(main, argv, capsys):
    """A command line's main(argv) -> (exit status, stdout, stderr), for argparse's errors
    (SystemExit) too."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


# Every torch.distributed call that moves data, and where its send buffer is: (position, keyword).
# isend and irecv themselves stay unwrapped: P2POp checks that its op *is* dist.isend or dist.irecv;
# their batches (how ring attention sends) are counted through batch_isend_irecv.
COLLECTIVES = {"all_to_all_single": (1, "input"), "all_gather": (1, "tensor"),
               "all_gather_into_tensor": (1, "input_tensor"), "all_gather_single": (1, "input_tensor"),
               "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "send": (0, "tensor"),
               "recv": (0, "tensor"), "batch_isend_irecv": None}


@contextlib.contextmanager
def counted_collectives():
    """Within the block, torch.distributed's collectives in this process are counted: each call appends
    (name, shape, bytes, group size) of what this rank sends to the yielded list (recv: the buffer it
    fills; batch_isend_irecv: one entry per isend, or one of 0 bytes for a batch without). The
    originals are back on exit."""
    import torch.distributed as dist
    log, originals = [], {}
    group_size = lambda group: dist.get_world_size(group)  # noqa: E731

    def wrap(name, where):
        original = originals[name] = getattr(dist, name)

        def counting(*args, **kwargs):
            if where is None:  # batch_isend_irecv([P2POp, ...])
                sends = [op for op in args[0] if op.op is dist.isend]
                log.extend((name, list(op.tensor.shape), op.tensor.numel() * op.tensor.element_size(),
                            group_size(op.group)) for op in sends)
                if not sends:
                    log.append((name, None, 0, group_size(args[0][0].group if args[0] else None)))
            else:
                position, key = where
                sent = args[position] if len(args) > position else kwargs[key]
                log.append((name, list(sent.shape), sent.numel() * sent.element_size(),
                            group_size(kwargs.get("group"))))
            return original(*args, **kwargs)
        setattr(dist, name, counting)

    try:
        for name, where in COLLECTIVES.items():
            if hasattr(dist, name):
                wrap(name, where)
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def write_tiny_ffn_lora(path, seed=5):
    """A rank-4 LoRA file (ComfyUI key names) on block 0's first FFN Linear of a dim-64, ffn-128 tiny model."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    save_file({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(4, 64, generator=g),
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(128, 4, generator=g)}, str(path))


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
