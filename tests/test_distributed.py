"""The 'distributed' strategy on CPU worker processes (gloo): sequence-parallel (Ulysses, ring, head
padding, hybrid) and CFG-parallel Wan 2.1 computes what one process computes; the worker group
survives interruption, fails fast and cleanly when a worker dies, and leaves no process behind.

Spawned workers import torch, so the groups are shared by many checks (module-scoped fixtures).
"""
import gc
import os
import signal
import subprocess
import sys
import time
import multiprocessing

import pytest
import torch
import torch.nn.functional as F

from wanvideo.checkpoint import load_wan_model
from wanvideo.parallel.distributed import DistributedWanRunner, ParallelDegrees, WorkerGroupError, choose_degrees
from wanvideo.parallel.distributed.attention import attention_with_lse, merge_partial_attention
from wanvideo.parallel.distributed.protocol import decode_request, detached_request, encode_request
from wanvideo.sampling.loop import Conditioning, sample_video
from wanvideo.tiny import make_tiny_checkpoint

from conftest import free_port, relative_error

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
GRID = (3, 6, 10)   # latent frames x height x width -> 3 * 3 * 5 = 45 tokens: divides by neither 2 nor 4
TOLERANCE = 1e-5


def _inputs(model_type, seed=0):
    """(x [1, 16, 3, 6, 10], positive, negative) for a tiny model (text_dim 32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, *GRID, generator=g)
    clip_fea = torch.randn(1, 257, 1280, generator=g) if model_type == "i2v" else None
    y = torch.randn(1, 20, *GRID, generator=g) if model_type == "i2v" else None
    positive = Conditioning([torch.randn(7, 32, generator=g)], clip_fea, y)
    negative = Conditioning([torch.randn(5, 32, generator=g)])  # takes the positive's image inputs
    return x, positive, negative


def _reference_velocity(model, x, t, positive, negative, cfg):
    with torch.no_grad():
        cond = torch.stack(model(list(x), t, positive.context, clip_fea=positive.clip_fea,
                                 y=None if positive.y is None else list(positive.y)))
        uncond = torch.stack(model(list(x), t, negative.context, clip_fea=positive.clip_fea,
                                   y=None if positive.y is None else list(positive.y)))
    return uncond + cfg * (cond - uncond)


def _alive(pid):
    return os.path.exists(f"/proc/{pid}")


# --- layout and numerics, in this process ---------------------------------------------------------

@pytest.mark.parametrize("world_size, heads, use_cfg, expected", [
    (8, 40, True, (2, 4, 1)), (8, 12, False, (1, 4, 2)), (5, 12, True, (1, 1, 5)), (4, 6, True, (2, 2, 1)),
    (6, 12, False, (1, 6, 1)), (1, 12, True, (1, 1, 1)), (2, 3, False, (1, 1, 2))])
def test_choose_degrees(world_size, heads, use_cfg, expected):
    degrees = choose_degrees(world_size, heads, use_cfg)
    assert (degrees.cfg, degrees.ulysses, degrees.ring) == expected
    degrees.check(world_size)


def test_degrees_that_do_not_fit_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"2 x 2 x 2 = 8.*4 ranks"):
        ParallelDegrees(2, 2, 2).check(4)
    with pytest.raises(ValueError, match="cfg degree 3"):
        ParallelDegrees(3, 1, 1).check(3)
    with pytest.raises(ValueError, match="world_size 0"):
        choose_degrees(0, 12, True)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_with_lse_matches_attention_and_logsumexp(fused):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, n, 4, 16, generator=g) for n in (9, 11, 11))
    key_mask = torch.ones(3, 11, dtype=torch.bool)
    key_mask[1, 7:] = False
    key_mask[2] = False  # a sample with no key at all in this chunk: empty, not NaN
    out, lse = attention_with_lse(q, k, v, key_mask, fused=fused)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 4.0
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    expected_out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores[:2], -1), v[:2].double())
    assert relative_error(out[:2], expected_out) < TOLERANCE
    assert relative_error(lse[:2], torch.logsumexp(scores[:2], -1)) < TOLERANCE
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()


def test_merging_partial_attentions_over_key_chunks_equals_full_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 3, 12, generator=g) for n in (10, 12, 12))
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, 4:] = False  # sample 1: chunks 2 and 3 are all padding
    out, lse = None, None
    for chunk in range(3):
        part = slice(4 * chunk, 4 * chunk + 4)
        part_out, part_lse = attention_with_lse(q, k[:, part], v[:, part], key_mask[:, part])
        out, lse = (part_out, part_lse) if out is None else merge_partial_attention(out, lse, part_out, part_lse)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=key_mask[:, None, None, :]).transpose(1, 2)
    assert relative_error(out, expected) < TOLERANCE


def test_request_travels_as_safetensors_bytes():
    x, positive, _ = _inputs("i2v")
    negative = Conditioning([torch.randn(3, 32)], clip_fea=torch.randn(1, 257, 1280))
    request = detached_request(kind="sample", request_id=7, degrees=ParallelDegrees(2, 1, 3), latents=x,
                               positive=positive, negative=negative, cfg=4.5, steps=9, scheduler="euler")
    back = decode_request(encode_request(request))
    assert (back.kind, back.request_id, back.degrees, back.cfg, back.steps, back.scheduler) == \
           ("sample", 7, ParallelDegrees(2, 1, 3), 4.5, 9, "euler")
    assert torch.equal(back.latents, x) and torch.equal(back.positive.y, positive.y)
    ragged = decode_request(encode_request(detached_request(kind="forward", latents=[x[0], x[0, :, :2]])))
    assert [tuple(u.shape) for u in ragged.latents] == [(16, 3, 6, 10), (16, 2, 6, 10)]
    assert torch.equal(back.positive.context[0], positive.context[0])
    assert torch.equal(back.negative.clip_fea, negative.clip_fea) and back.negative.y is None
    assert back.init_latent is None and back.timestep is None


def test_runner_refuses_bad_devices_and_degrees(tmp_path):
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v")
    with pytest.raises(ValueError, match="non-empty list"):
        DistributedWanRunner(path, [])
    with pytest.raises(ValueError, match="all CUDA GPUs or all CPU"):
        DistributedWanRunner(path, [CPU, torch.device("meta")])
    with pytest.raises(ValueError, match="3 ranks"):
        DistributedWanRunner(path, [CPU] * 3, degrees=ParallelDegrees(2, 1, 1))


def test_worker_devices_are_read_by_the_one_parser_and_checked_for_a_group():
    from wanvideo.parallel.distributed.workers import _as_devices
    assert _as_devices("cpu,cpu") == [CPU, CPU] and _as_devices([CPU, "cpu"]) == [CPU, CPU]
    with pytest.raises(ValueError, match="list a GPU twice"):
        _as_devices("0,cuda:0")
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="cannot see"):
            _as_devices([7])
    with pytest.raises(ValueError, match="not a device"):
        _as_devices("cpu,gpu0")


# --- four ranks, t2v, 6 heads ------------------------------------------------------------------------

def runner_and_plain_model(tmp_path_factory, model_type, num_heads, ranks):
    """A CPU worker group on a tiny model (dim 96) and the same model in this process; shut down after."""
    path, _, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("dist") / f"{model_type}.safetensors", model_type,
                                      dim=96, num_heads=num_heads)
    runner = DistributedWanRunner(path, [CPU] * ranks, base_precision="fp32")
    yield runner, load_wan_model(path, CPU, "fp32")
    runner.shutdown()


@pytest.fixture(scope="module")
def t2v_four_ranks(tmp_path_factory):
    yield from runner_and_plain_model(tmp_path_factory, "t2v", num_heads=6, ranks=4)


@pytest.mark.parametrize("degrees", [
    ParallelDegrees(1, 2, 2),   # hybrid: Ulysses pairs, ring of two
    ParallelDegrees(1, 1, 4),   # ring only
    ParallelDegrees(1, 4, 1),   # Ulysses 4 over 6 heads: zero-padded heads
    ParallelDegrees(2, 2, 1),   # CFG parallel x Ulysses
    ParallelDegrees(2, 1, 2),   # CFG parallel x ring
], ids=str)
def test_four_ranks_forward_equals_single_process(t2v_four_ranks, degrees):
    runner, model = t2v_four_ranks
    x, positive, negative = _inputs("t2v")
    t = torch.tensor([700.0])
    out = runner.forward(x, t, positive, negative, cfg=4.0, degrees=degrees)
    assert relative_error(out, _reference_velocity(model, x, t, positive, negative, 4.0)) < TOLERANCE


@pytest.mark.parametrize("degrees", [ParallelDegrees(1, 2, 2), ParallelDegrees(2, 1, 2)], ids=str)
def test_four_ranks_ragged_batch_equals_single_process(t2v_four_ranks, degrees):
    """Two videos of 45 and 12 tokens: per-sample key masks travel with the shards."""
    runner, model = t2v_four_ranks
    g = torch.Generator().manual_seed(8)
    x = [torch.randn(16, *GRID, generator=g), torch.randn(16, 2, 4, 6, generator=g)]
    t = torch.tensor([800.0, 300.0])
    positive = Conditioning([torch.randn(7, 32, generator=g), torch.randn(9, 32, generator=g)])
    negative = Conditioning([torch.randn(5, 32, generator=g), torch.randn(4, 32, generator=g)])
    out = runner.forward(x, t, positive, negative, cfg=3.0, degrees=degrees)
    with torch.no_grad():
        cond, uncond = model(x, t, positive.context), model(x, t, negative.context)
    for o, c, u in zip(out, cond, uncond):
        assert relative_error(o, u + 3.0 * (c - u)) < TOLERANCE


def test_four_ranks_sampling_equals_single_process(t2v_four_ranks):
    runner, model = t2v_four_ranks
    x, positive, negative = _inputs("t2v", seed=3)
    with torch.no_grad():
        expected = sample_video(model, x, positive, negative, steps=3, cfg=5.0, shift=3.0, progress=False)
    steps = []
    out = runner.sample(x, positive, negative, steps=3, cfg=5.0, shift=3.0, callback=lambda i, n, x0: steps.append(i))
    assert runner.degrees_for(5.0) == ParallelDegrees(2, 2, 1)
    assert relative_error(out, expected) < TOLERANCE
    assert steps == [0, 1, 2]
    unguided = runner.sample(x, positive, steps=2, cfg=1.0, shift=3.0)  # all four ranks on one sequence
    with torch.no_grad():
        expected = sample_video(model, x, positive, None, steps=2, cfg=1.0, shift=3.0, progress=False)
    assert runner.degrees_for(1.0) == ParallelDegrees(1, 2, 2)
    assert relative_error(unguided, expected) < TOLERANCE


# --- two ranks, i2v, 3 heads ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def i2v_two_ranks(tmp_path_factory):
    yield from runner_and_plain_model(tmp_path_factory, "i2v", num_heads=3, ranks=2)


@pytest.mark.parametrize("degrees", [ParallelDegrees(1, 2, 1), ParallelDegrees(1, 1, 2), ParallelDegrees(2, 1, 1)],
                         ids=str)
def test_two_ranks_i2v_forward_equals_single_process(i2v_two_ranks, degrees):
    runner, model = i2v_two_ranks
    x, positive, negative = _inputs("i2v")
    t = torch.tensor([400.0])
    out = runner.forward(x, t, positive, negative, cfg=3.0, degrees=degrees)
    assert relative_error(out, _reference_velocity(model, x, t, positive, negative, 3.0)) < TOLERANCE


@pytest.mark.parametrize("degrees", [None, ParallelDegrees(1, 1, 2)], ids=str)
def test_two_ranks_i2v_sampling_equals_single_process(i2v_two_ranks, degrees):
    runner, model = i2v_two_ranks
    x, positive, negative = _inputs("i2v", seed=4)
    with torch.no_grad():
        expected = sample_video(model, x, positive, negative, steps=3, cfg=4.0, shift=5.0, scheduler="euler",
                                progress=False)
    previews = []
    out = runner.sample(x, positive, negative, steps=3, cfg=4.0, shift=5.0, scheduler="euler", degrees=degrees,
                        previews=True, callback=lambda i, n, x0: previews.append(x0))
    assert relative_error(out, expected) < TOLERANCE
    assert len(previews) == 3 and previews[-1].shape == x.shape


def test_interrupt_stops_every_rank_and_the_group_survives(i2v_two_ranks):
    runner, model = i2v_two_ranks
    x, positive, negative = _inputs("i2v", seed=5)
    seen = []

    class Cancelled(Exception):
        pass

    def check_interrupt():
        if seen:
            raise Cancelled()

    with pytest.raises(Cancelled):
        runner.sample(x, positive, negative, steps=200, cfg=4.0, callback=lambda i, n, x0: seen.append(i),
                      check_interrupt=check_interrupt)
    assert 1 <= len(seen) < 200
    pids = [p.pid for p in runner._group.processes]
    t = torch.tensor([900.0])
    out = runner.forward(x, t, positive, negative, cfg=4.0)  # same workers, still in step
    assert [p.pid for p in runner._group.processes] == pids
    assert relative_error(out, _reference_velocity(model, x, t, positive, negative, 4.0)) < TOLERANCE


def test_killed_worker_raises_and_the_next_run_starts_a_fresh_group(i2v_two_ranks):
    runner, model = i2v_two_ranks
    x, positive, negative = _inputs("i2v", seed=6)
    runner.start()
    old_pids = [p.pid for p in runner._group.processes]

    def kill_rank_one(step, total, x0):
        if step == 0:
            os.kill(old_pids[1], signal.SIGKILL)

    began = time.monotonic()
    with pytest.raises(WorkerGroupError, match=r"rank 1 \(pid \d+\) was killed by signal 9"):
        runner.sample(x, positive, negative, steps=500, cfg=4.0, callback=kill_rank_one)
    assert time.monotonic() - began < 30
    assert not runner.started and not any(_alive(pid) for pid in old_pids)

    t = torch.tensor([500.0])
    out = runner.forward(x, t, positive, negative, cfg=2.0)
    assert not set(old_pids) & {p.pid for p in runner._group.processes}
    assert relative_error(out, _reference_velocity(model, x, t, positive, negative, 2.0)) < TOLERANCE

    idle_pids = [p.pid for p in runner._group.processes]
    os.kill(idle_pids[0], signal.SIGKILL)  # dies between runs: the next run just starts afresh
    runner._group.processes[0].join(5)
    out = runner.forward(x, t, positive, negative, cfg=2.0)
    assert relative_error(out, _reference_velocity(model, x, t, positive, negative, 2.0)) < TOLERANCE

    new_pids = [p.pid for p in runner._group.processes]
    assert not set(new_pids) & set(idle_pids)
    runner.shutdown()  # a start/stop cycle leaves nothing behind
    all_pids = old_pids + idle_pids + new_pids
    assert not any(_alive(pid) for pid in all_pids)
    assert not {p.pid for p in multiprocessing.active_children()} & set(all_pids)


def test_dropped_runner_stops_its_workers(tmp_path):
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v")
    runner = DistributedWanRunner(path, [CPU] * 2, base_precision="fp32")
    runner.start()
    pids = [p.pid for p in runner._group.processes]
    assert all(_alive(pid) for pid in pids)
    del runner
    gc.collect()
    assert not any(_alive(pid) for pid in pids)


HOST_SCRIPT = """
if __name__ != "__main__":
    raise SystemExit("a worker re-ran the host's __main__")
import importlib, importlib.util, os, sys, torch
# Loaded as ComfyUI loads a custom node: by file location, its folder not on sys.path.
spec = importlib.util.spec_from_file_location("Custom-Node", os.path.join(sys.argv[1], "Custom-Node", "__init__.py"))
sys.modules["Custom-Node"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["Custom-Node"])
distributed = importlib.import_module("Custom-Node.wanvideo.parallel.distributed")
loop = importlib.import_module("Custom-Node.wanvideo.sampling.loop")
checkpoint = importlib.import_module("Custom-Node.wanvideo.checkpoint")
x, t = torch.randn(1, 16, 3, 6, 10), torch.tensor([600.0])
positive = loop.Conditioning([torch.randn(7, 32)])
with distributed.DistributedWanRunner(sys.argv[2], [torch.device("cpu")] * 2, base_precision="fp32") as runner:
    out = runner.forward(x, t, positive, degrees=distributed.ParallelDegrees(1, 1, 2))
with torch.no_grad():
    expected = checkpoint.load_wan_model(sys.argv[2], "cpu", "fp32")(list(x), t, positive.context)[0]
print("relative error", ((out[0] - expected).norm() / expected.norm()).item())
"""


def test_workers_start_inside_a_host_that_imported_the_package_under_another_name(tmp_path):
    """As in ComfyUI: the package lives under a custom-node name that a fresh process cannot import,
    and the host's __main__ must not run again in the workers."""
    host_package = tmp_path / "Custom-Node"
    host_package.mkdir()
    (host_package / "__init__.py").write_text("")
    (host_package / "wanvideo").symlink_to(os.path.join(REPO_ROOT, "wanvideo"))
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "host_main.py").write_text(HOST_SCRIPT)
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(tmp_path / "host" / "host_main.py"), str(tmp_path), str(path)],
                          env=env, cwd=str(tmp_path / "host"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("relative error")[-1]) < TOLERANCE


# --- torchrun entry point -----------------------------------------------------------------------

def test_torchrun_workers_serve_requests(tmp_path):
    from wanvideo.parallel.distributed.remote import TorchrunWanClient
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v", dim=96, num_heads=3)
    serve_port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "wanvideo.parallel.distributed.worker",
               "--checkpoint", str(path), "--device", "cpu", "--precision", "fp32",
               "--serve-host", "127.0.0.1", "--serve-port", str(serve_port)]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    # A session of its own, so a failed check can end the ranks too, not only the torchrun agent.
    job = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        client = TorchrunWanClient("127.0.0.1", serve_port, connect_timeout_s=60, step_timeout_s=60)
        assert client.world_size == 2
        x, positive, negative = _inputs("t2v", seed=7)
        out = client.sample(x, positive, negative, steps=2, cfg=4.0, shift=3.0)  # cfg 2 x ulysses 1 x ring 1
        ring = client.forward(x, torch.tensor([300.0]), positive, negative, cfg=4.0,
                              degrees=ParallelDegrees(1, 1, 2))
        # The shared client's checks: bad requests fail here, and the job keeps serving.
        assert client.degrees_for(4.0) == ParallelDegrees(2, 1, 1) and client.served.in_dim == 16
        with pytest.raises(ValueError, match="needs a negative Conditioning"):
            client.sample(x, positive, None, steps=2, cfg=4.0)
        with pytest.raises(ValueError, match="divide by the patch size"):
            client.sample(x[:, :, :, :5], positive, negative, steps=2)
        with pytest.raises(ValueError, match=r"\[B, 16, F, H, W\]"):
            client.forward(x[:, :8], torch.tensor([300.0]), positive)
        with pytest.raises(ValueError, match=r"2 x 2 x 1 = 4.*2 ranks"):
            client.forward(x, torch.tensor([300.0]), positive, degrees=ParallelDegrees(2, 2, 1))

        def ctrl_c(step, total, x0):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):  # the cancelled run must not hold up the next one
            client.sample(x, positive, negative, steps=100_000, cfg=4.0, scheduler="euler", callback=ctrl_c)
        began = time.monotonic()
        again = client.sample(x, positive, negative, steps=2, cfg=4.0, shift=3.0)
        assert time.monotonic() - began < 30
        client.shutdown_workers()
        assert job.wait(timeout=60) == 0, job.stderr.read().decode()[-3000:]
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.wait()
    model = load_wan_model(path, CPU, "fp32")
    with torch.no_grad():
        expected = sample_video(model, x, positive, negative, steps=2, cfg=4.0, shift=3.0, progress=False)
    assert relative_error(out, expected) < TOLERANCE and relative_error(again, expected) < TOLERANCE
    t = torch.tensor([300.0])
    assert relative_error(ring, _reference_velocity(model, x, t, positive, negative, 4.0)) < TOLERANCE


def test_inpaint_travels_to_the_workers(tmp_path):
    """TI2V-5B image-to-video (an Inpaint: clean first latent frame, per-token timesteps) sampled by
    2 workers, with CFG parallel (cfg 4) and with Ulysses (cfg 1), equals the single process."""
    path, _, _ = make_tiny_checkpoint(tmp_path / "ti2v.safetensors", "ti2v")
    plain = load_wan_model(path, base_precision="fp32")
    g = torch.Generator().manual_seed(11)
    noise, clean = torch.randn(1, 48, *GRID, generator=g), torch.randn(1, 48, *GRID, generator=g)
    mask = torch.ones(1, 1, *GRID)
    mask[:, :, 0] = 0  # keep the first latent frame: the image
    positive, negative = Conditioning([torch.randn(7, 32, generator=g)]), Conditioning([torch.randn(5, 32, generator=g)])
    with DistributedWanRunner(path, [CPU] * 2, base_precision="fp32") as runner:
        for cfg in (4.0, 1.0):
            settings = dict(steps=3, cfg=cfg, shift=3.0, scheduler="euler")
            with torch.no_grad():
                expected = sample_video(plain, noise, positive, negative, inpaint=(clean, mask), progress=False,
                                        **settings)
            out = runner.sample(noise, positive, negative, inpaint=(clean, mask), **settings)
            assert relative_error(out, expected) <= TOLERANCE, cfg
            assert torch.equal(out[:, :, 0], clean[:, :, 0])  # the kept frame comes back as given
