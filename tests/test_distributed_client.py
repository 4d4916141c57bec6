"""The spawned worker group's client and lifetimes, on CPU worker processes (gloo) and a tiny
model: workers load through the one load sequence (LoRAs merged); a run started right after Ctrl-C
is not held up by the cancelled one, and a group whose processes fail to start part-way leaves no
worker waiting for its peers (issue 14, item 6). Start-up (issue 13, item 5): every phase is timed
and reported, restarts fork from the preloaded forkserver, a group of one GPU skips NCCL.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from wanvideo.checkpoint import load_wan_model
from wanvideo.parallel.distributed import DistributedWanRunner, ParallelDegrees, WorkerGroupError
from wanvideo.parallel.distributed import workers
from wanvideo.pipeline import LoadSettings, load_prepared_model
from wanvideo.sampling.loop import Conditioning, sample_video
from wanvideo.tiny import make_tiny_checkpoint

from conftest import relative_error

CPU = torch.device("cpu")
TOLERANCE = 1e-5
# The cancelled run would take far longer than the bound if the workers finished it (a step of
# the tiny model takes milliseconds, but 100000 of them take minutes).
CANCELLED_STEPS = 100_000
NEXT_RUN_BOUND_S = 30.0


def _alive(pid):
    return os.path.exists(f"/proc/{pid}")


def _write_lora(path, model, strength_scale=0.2):
    """A rank-4 LoRA (official key names) on two attention projections of `model`."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o"):
        weight = model.get_submodule(name).weight
        state[f"{name}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
        state[f"{name}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=g) * strength_scale
        state[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def t2v_two_ranks(tmp_path_factory):
    """(runner with a LoRA, the plain model, the same model with the LoRA merged in this process)."""
    folder = tmp_path_factory.mktemp("client")
    path, _, _ = make_tiny_checkpoint(folder / "t2v.safetensors", "t2v", dim=96, num_heads=3)
    plain = load_wan_model(path, CPU, "fp32")
    lora = _write_lora(folder / "lora.safetensors", plain)
    runner = DistributedWanRunner(path, [CPU] * 2, base_precision="fp32", loras=[(lora, 0.7)])
    merged, _, _ = load_prepared_model(path, CPU, LoadSettings(base_precision="fp32", loras=[(str(lora), 0.7)]))
    yield runner, plain, merged
    runner.shutdown()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 6, 10, generator=g)
    return x, Conditioning([torch.randn(7, 32, generator=g)]), Conditioning([torch.randn(5, 32, generator=g)])


def test_workers_load_through_the_one_load_sequence_with_loras(t2v_two_ranks):
    runner, plain, merged = t2v_two_ranks
    x, positive, _ = _inputs(10)
    t = torch.tensor([600.0])
    out = runner.forward(x, t, positive, degrees=ParallelDegrees(1, 1, 2))
    with torch.no_grad():
        expected, unmerged = (torch.stack(m(list(x), t, positive.context)) for m in (merged, plain))
    assert relative_error(out, expected) < TOLERANCE
    assert relative_error(out, unmerged) > 1e-3  # the LoRA is there


def test_a_run_right_after_ctrl_c_is_not_held_up_by_the_cancelled_one(t2v_two_ranks):
    runner, _, model = t2v_two_ranks
    x, positive, negative = _inputs(11)

    def ctrl_c(step, total, x0):  # Ctrl-C while the workers are inside the run
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.sample(x, positive, negative, steps=CANCELLED_STEPS, cfg=4.0, scheduler="euler", callback=ctrl_c)
    pids = [p.pid for p in runner._group.processes]

    began = time.monotonic()
    # Bounded either way: a run stuck behind the cancelled one is given up after the bound (and fails).
    give_up = lambda: time.monotonic() - began > NEXT_RUN_BOUND_S  # noqa: E731
    out = runner.sample(x, positive, negative, steps=2, cfg=4.0, shift=3.0, check_interrupt=give_up)
    assert time.monotonic() - began < NEXT_RUN_BOUND_S
    assert [p.pid for p in runner._group.processes] == pids  # the same group, still in step
    with torch.no_grad():
        expected = sample_video(model, x, positive, negative, steps=2, cfg=4.0, shift=3.0, progress=False)
    assert relative_error(out, expected) < TOLERANCE


def test_a_worker_that_fails_to_start_stops_the_ones_already_started(tmp_path, monkeypatch):
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v")
    started = []
    process_class = workers.worker_context().Process  # the forkserver's on Linux, spawn's elsewhere
    real_start = process_class.start

    def start_one_then_fail(process):
        if started:
            raise OSError("injected: no more processes")
        real_start(process)
        started.append(process)

    monkeypatch.setattr(process_class, "start", start_one_then_fail)
    runner = DistributedWanRunner(path, [CPU] * 4, base_precision="fp32")
    try:
        began = time.monotonic()
        with pytest.raises(WorkerGroupError, match=r"rank 1 of 4.*no more processes"):
            runner.start()
        assert len(started) == 1 and not runner.started
        deadline = began + 10.0
        while _alive(started[0].pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(started[0].pid), "rank 0 still waits for its peers in init_process_group"
    finally:
        for process in started:  # without the fix rank 0 would wait 30 minutes: do not leave it behind
            if process.is_alive():
                process.kill()
                process.join(5)


# --- start-up: timed by phase, workers forked from a preloaded forkserver (issue 13, item 5) ------

def _parent_pid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


HAS_PROC = os.path.exists("/proc/self/stat")  # Linux; macOS also forks from a forkserver but has no /proc


def test_start_up_is_timed_by_phase_and_restarts_fork_from_the_forkserver(tmp_path):
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v", dim=96, num_heads=3)
    x, positive, negative = _inputs(12)
    with DistributedWanRunner(path, [CPU] * 2, base_precision="fp32") as runner:
        for start in ("first", "restart"):
            began = time.time()
            runner.start()
            wall = time.time() - began
            seconds = runner.startup_seconds
            assert set(seconds) == set(workers.STARTUP_PHASES) | {"until_ready"}, (start, seconds)
            assert all(seconds[phase] > 0 for phase in workers.STARTUP_PHASES), (start, seconds)
            # Consecutive phases of the slowest rank, inside what the parent waited.
            assert sum(seconds[phase] for phase in workers.STARTUP_PHASES) <= seconds["until_ready"] <= wall
            runner.sample(x, positive, negative, steps=2, cfg=4.0)
            assert 0 < runner.startup_seconds["first_step"] < wall + 60, (start, runner.startup_seconds)
            first_step = runner.startup_seconds["first_step"]
            runner.forward(x, torch.tensor([500.0]), positive)  # later requests do not overwrite it
            assert runner.startup_seconds["first_step"] == first_step
            if workers.worker_context().get_start_method() == "forkserver" and HAS_PROC:
                parents = {_parent_pid(p.pid) for p in runner._group.processes}
                assert len(parents) == 1 and os.getpid() not in parents  # forked by the forkserver
            runner.shutdown()
            assert runner.startup_seconds is not None  # the figures outlive the group, for reports


def test_a_group_of_one_gpu_skips_nccl_unless_its_weights_are_sharded():
    gpu = [torch.device("cuda", 0)]
    assert workers._backend(gpu, shard_weights=False) == "gloo"
    assert workers._backend(gpu, shard_weights=True) == "nccl"  # FSDP gathers GPU tensors even over one rank
    assert workers._backend(gpu + [torch.device("cuda", 1)], shard_weights=False) == "nccl"
    assert workers._backend([CPU, CPU], shard_weights=True) == "gloo"


def test_a_worker_takes_the_parents_environment_of_the_group_start(monkeypatch):
    """A forkserver child inherits the forkserver's environment, which may be older than the parent's."""
    monkeypatch.setenv("WAN_TEST_STALE", "1")
    monkeypatch.setenv("WAN_TEST_CHANGED", "old")
    parent = {k: v for k, v in os.environ.items() if k != "WAN_TEST_STALE"}
    parent["WAN_TEST_CHANGED"] = "new"
    workers._adopt_environment(parent)
    assert "WAN_TEST_STALE" not in os.environ and os.environ["WAN_TEST_CHANGED"] == "new"
    assert dict(os.environ) == parent


def test_gpu_workers_import_the_compiler_before_their_first_request():
    """In a fresh process (this one may have imported the compiler already): importing the worker
    module leaves the compiler out, and _import_compiler brings it in for a GPU, not for the CPU."""
    script = ("import sys, torch\n"
              "from wanvideo.parallel.distributed import workers\n"
              "compiler = 'torch._inductor.compile_fx'\n"
              "assert compiler not in sys.modules, 'imported with the worker module'\n"
              "assert workers._import_compiler(torch.device('cpu')) is None and compiler not in sys.modules\n"
              "seconds = workers._import_compiler(torch.device('cuda', 0))  # imports only: no GPU needed\n"
              "assert seconds is not None and seconds >= 0 and compiler in sys.modules\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
