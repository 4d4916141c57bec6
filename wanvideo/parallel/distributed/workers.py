"""A group of worker processes, one per device, started from ComfyUI's single process.

`DistributedWanRunner` spawns one process per listed device (torch.multiprocessing, spawn
context), joins them with torch.distributed (NCCL on GPUs, gloo on CPU) through a free TCP port on
127.0.0.1, and lets every worker load its own copy of the weights from the checkpoint file (the
model never travels through a pipe). Requests go to every worker through its own queue, as
safetensors bytes (protocol.py); the denoising loop runs inside the workers; rank 0 sends progress
and the result back on one queue.

A worker imports nothing of the parent but this package, found by its location (spawn_entry.py):
ComfyUI's main.py (which would start a second ComfyUI) and the custom-node name under which
ComfyUI imported this package never reach it.

The parent never blocks without a bound: it polls the result queue, checks that every worker is
alive, calls `check_interrupt`, and gives up after `step_timeout_s` without news. A dead or hung
worker tears the whole group down (an error says which rank); the next run starts a fresh group.
Interruption sets a shared event that all ranks check, and agree on, before every step.
"""
import contextlib
import logging
import multiprocessing
import os
import queue
import runpy
import sys
import socket
import time
import traceback
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from ...checkpoint import inspect_checkpoint
from ...sampling.loop import Conditioning, check_inputs
from ...sampling.schedulers import flow_sigmas, make_scheduler
from .protocol import decode_request, detached_request, encode_request
from .serving import RunInterrupted, WorkerSession
from .topology import choose_degrees

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
STOP_GRACE_S = 10.0


class WorkerGroupError(RuntimeError):
    """A worker failed, died or stopped answering; the group has been torn down."""


# --- the worker process ---------------------------------------------------------------------------

def _parent_alive():
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def _next_request(request_queue):
    """The next request, or None when told to stop or when ComfyUI's process is gone."""
    while True:
        try:
            return request_queue.get(timeout=1.0)
        except queue.Empty:
            if not _parent_alive():
                return None


def worker_main(rank, world_size, init_method, backend, device, load_args, request_queue, message_queue,
                stop_event, cpu_threads, collective_timeout_s):
    """One spawned worker (rank): joins the group, loads the model, sends ('ready', None, rank),
    then serves encoded requests from request_queue until None arrives."""
    logging.basicConfig(level=logging.INFO, format=f"[wan worker {rank}] %(levelname)s %(name)s: %(message)s")
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    request_id = None
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        session = WorkerSession(device=device, **load_args)
        message_queue.put(("ready", None, rank))
        while (payload := _next_request(request_queue)) is not None:
            request = decode_request(payload)
            request_id = request.request_id

            def on_step(step, total, x0):
                if rank == 0:
                    preview = x0.detach().to("cpu", torch.float32).clone() if request.previews else None
                    message_queue.put(("progress", request_id, (step, total, preview)))

            try:
                result = session.run(request, stop_event.is_set, on_step)
            except RunInterrupted:
                if rank == 0:
                    message_queue.put(("interrupted", request_id, None))
                continue
            if rank == 0:
                to_cpu = lambda t: t.detach().to("cpu").clone()
                message_queue.put(("result", request_id,
                                   [to_cpu(t) for t in result] if isinstance(result, list) else to_cpu(result)))
    except BaseException:
        message_queue.put(("error", request_id, (rank, traceback.format_exc())))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- the parent side ------------------------------------------------------------------------------

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_processes(processes, request_queues, message_queue, graceful):
    """Ask the workers to leave, then terminate and kill whatever is left; join them all."""
    if graceful:
        for request_queue in request_queues:
            try:
                request_queue.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join(5.0)
    for q in (*request_queues, message_queue):
        q.close()
        q.cancel_join_thread()  # never block on data nobody will read


@contextlib.contextmanager
def _main_module_hidden():
    """Keep spawn from re-running the parent's __main__ (ComfyUI's main.py) in the workers."""
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__spec__", "__file__") if hasattr(main, name)}
    try:
        if main is not None:
            main.__spec__ = None
            if hasattr(main, "__file__"):
                del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


class _WorkerGroup:
    """The processes, queues and stop event of one started group."""

    def __init__(self, devices, load_args, cpu_threads, collective_timeout_s):
        context = torch_mp.get_context("spawn")
        backend = "nccl" if devices[0].type == "cuda" else "gloo"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.message_queue = context.Queue()
        self.request_queues = [context.Queue() for _ in devices]
        self.stop_event = context.Event()
        self.processes = []
        entry = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawn_entry.py")
        for rank, device in enumerate(devices):
            worker_args = (rank, len(devices), init_method, backend, device, load_args, self.request_queues[rank],
                           self.message_queue, self.stop_event, cpu_threads, collective_timeout_s)
            process = context.Process(target=runpy.run_path, name=f"wan-worker-{rank}", args=(entry,),
                                      kwargs=dict(init_globals={"WAN_WORKER_ARGS": worker_args},
                                                  run_name="__wan_worker__"))
            with _main_module_hidden():
                process.start()
            self.processes.append(process)
        # Runs once: on stop(), when the group is garbage collected, or at interpreter exit. (Not daemon
        # processes: those may not start children, which compilers inside a worker may need.)
        self._finalizer = weakref.finalize(self, _stop_processes, self.processes, self.request_queues,
                                           self.message_queue, True)

    def dead_workers(self):
        """[(rank, pid, exitcode)] of workers that have exited."""
        return [(rank, p.pid, p.exitcode) for rank, p in enumerate(self.processes) if not p.is_alive()]

    def stop(self, graceful=True):
        if self._finalizer.alive:
            self._finalizer.detach()
            _stop_processes(self.processes, self.request_queues, self.message_queue, graceful)


def _as_devices(devices):
    if isinstance(devices, (str, torch.device)) or not devices:
        raise ValueError(f"devices must be a non-empty list of torch.device; got {devices!r}.")
    devices = [torch.device(d) for d in devices]
    kinds = {d.type for d in devices}
    if kinds - {"cpu", "cuda"} or len(kinds) > 1:
        raise ValueError(f"devices {[str(d) for d in devices]} must be all CUDA GPUs or all CPU "
                         "(NCCL joins GPUs, gloo joins CPU processes; they do not mix).")
    if "cuda" in kinds:
        devices = [torch.device("cuda", d.index if d.index is not None else 0) for d in devices]
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices {[str(d) for d in devices]} list a GPU twice; NCCL needs one process per GPU. "
                             "List each GPU once.")
        if not torch.cuda.is_available() or max(d.index for d in devices) >= torch.cuda.device_count():
            raise ValueError(f"devices {[str(d) for d in devices]} name GPUs this process cannot see "
                             f"({torch.cuda.device_count()} visible). Check CUDA_VISIBLE_DEVICES.")
    return devices


class DistributedWanRunner:
    """Sequence- and CFG-parallel Wan 2.1 on worker processes, one per device.

    checkpoint_path: a Wan 2.1 .safetensors file, loaded by every worker with
      load_wan_model(path, device, base_precision, quantization, attention_mode);
    devices: list of torch.device, all CUDA (NCCL) or all CPU (gloo; for tests);
    degrees: a ParallelDegrees for every run, or None to choose per run with choose_degrees
      (cfg 2 when guidance is on and the device count is even, then Ulysses, then ring);
    start_timeout_s: bound on process start and weight loading; step_timeout_s: bound on the time
      between two messages from the workers during a run (a step, or the first step);
    cpu_threads_per_worker: torch CPU threads of each worker (default: the cores shared out).

    The group starts on first use, lives across runs and ends with shutdown(), when the runner is
    garbage collected, or at exit. Usable as a context manager.
    """

    def __init__(self, checkpoint_path, devices, base_precision="bf16", quantization="disabled",
                 attention_mode="sdpa", degrees=None, start_timeout_s=900.0, step_timeout_s=900.0,
                 cpu_threads_per_worker=None, collective_timeout_s=1800.0, loras=()):
        self.devices = _as_devices(devices)
        self.info = inspect_checkpoint(str(checkpoint_path))
        self.num_heads = self.info.config["num_heads"]
        if degrees is not None:
            degrees.check(len(self.devices))
        self.degrees = degrees
        self.load_args = dict(checkpoint_path=str(checkpoint_path), base_precision=base_precision,
                              quantization=quantization, attention_mode=attention_mode,
                              loras=[(str(path), float(strength)) for path, strength in loras])
        self.start_timeout_s, self.step_timeout_s = start_timeout_s, step_timeout_s
        self.collective_timeout_s = collective_timeout_s
        if cpu_threads_per_worker is None:  # share the cores out instead of every worker taking them all
            cpu_threads_per_worker = max(1, (os.cpu_count() or 1) // len(self.devices))
        self.cpu_threads_per_worker = cpu_threads_per_worker
        self._group = None
        self._request_id = 0

    # --- lifetime -----------------------------------------------------------------------------

    @property
    def world_size(self):
        return len(self.devices)

    @property
    def started(self):
        return self._group is not None

    def start(self):
        """Start the workers and wait until every one has loaded its weights (no-op when running)."""
        if self._group is not None:
            return
        logger.info("Starting %d Wan workers on %s", self.world_size, ", ".join(map(str, self.devices)))
        began = time.monotonic()
        self._group = _WorkerGroup(self.devices, self.load_args, self.cpu_threads_per_worker,
                                   self.collective_timeout_s)
        ready = set()
        while len(ready) < self.world_size:
            kind, _, payload = self._next_message(self.start_timeout_s, began, "loading the model")
            if kind == "ready":
                ready.add(payload)
            elif kind == "error":
                self._fail(self._failure_report("loading the model", payload))
        logger.info("Wan workers ready in %.1f s", time.monotonic() - began)

    def shutdown(self):
        """Stop the workers and wait for them to exit. The runner can start again later."""
        if self._group is not None:
            group, self._group = self._group, None
            group.stop(graceful=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def _fail(self, message):
        """Tear the group down (no grace: workers may be stuck in collectives) and raise."""
        if self._group is not None:
            group, self._group = self._group, None
            group.stop(graceful=False)
        raise WorkerGroupError(message + "\nThe worker group was shut down; the next run starts a fresh one.")

    def _failure_report(self, doing, error=None):
        """Which workers exited and how, then the traceback a worker sent (error = (rank, text))."""
        lines = []
        for rank, pid, code in self._group.dead_workers():
            if error is not None and rank == error[0]:
                continue  # its exit follows from the error below
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            lines.append(f"Wan worker rank {rank} (pid {pid}) {how} while {doing}.")
        if error is not None:
            lines.append(f"Wan worker rank {error[0]} failed while {doing}:\n{error[1]}")
        return "\n".join(lines)

    def _next_message(self, timeout_s, since, doing, idle=None):
        """The next worker message; raises WorkerGroupError on a dead worker or after timeout_s of silence.
        idle(): called between polls."""
        while True:
            try:
                return self._group.message_queue.get(timeout=POLL_INTERVAL_S)
            except queue.Empty:
                pass
            if idle is not None:
                idle()
            if self._group.dead_workers():
                # A dying worker may have posted its traceback just now; report it with the exit codes.
                try:
                    kind, _, payload = self._group.message_queue.get(timeout=0.5)
                except queue.Empty:
                    kind, payload = None, None
                self._fail(self._failure_report(doing, payload if kind == "error" else None))
            if time.monotonic() - since > timeout_s:
                self._fail(f"The Wan workers sent nothing for {timeout_s:.0f} s while {doing}; a worker hangs "
                           "(or one step takes longer: raise step_timeout_s).")

    # --- runs ---------------------------------------------------------------------------------

    def degrees_for(self, cfg):
        """The layout a run with this guidance scale uses."""
        return self.degrees or choose_degrees(self.world_size, self.num_heads, use_cfg=cfg != 1)

    def sample(self, noise, positive, negative=None, steps=30, cfg=5.0, shift=5.0, scheduler="unipc", denoise=1.0,
               init_latent=None, batch_cfg=None, callback=None, check_interrupt=None, previews=False, degrees=None):
        """Denoise noise [B, 16, F, H, W] -> latents [B, 16, F, H, W] float32 on the CPU.

        Arguments as wanvideo.sampling.loop.sample_video (positive / negative are Conditioning).
        callback(step_index, total_steps, x0 or None): after each step (x0 [B, 16, F, H, W] with
          previews=True). check_interrupt(): polled while waiting; raising (or returning True)
          stops every worker at its next step, and the exception propagates.
        degrees: this run's layout (default: the runner's, else choose_degrees).
        """
        self._check_inputs(noise, positive, negative)
        sigmas = flow_sigmas(steps, shift, denoise)  # bad settings fail here, not inside the workers
        make_scheduler(scheduler, sigmas)
        check_inputs(noise, positive, negative, cfg, denoise, init_latent, self.info.config["patch_size"])
        return self._run(dict(kind="sample", noise=noise, positive=positive, negative=negative, cfg=cfg, steps=steps,
                              shift=shift, scheduler=scheduler, denoise=denoise, init_latent=init_latent,
                              batch_cfg=batch_cfg, previews=previews), degrees, callback, check_interrupt)

    def forward(self, x, timestep, positive, negative=None, cfg=1.0, degrees=None):
        """One guided evaluation: x [B, C, F, H, W], timestep [B] (0..1000) -> velocity [B, 16, F, H, W]
        (uncond + cfg * (cond - uncond); the positive branch alone at cfg 1). x may also be a list
        of [C, F_i, H_i, W_i] of different sizes (t2v; a ragged batch): then a list comes back."""
        channels = self.info.config["in_dim"] - (0 if positive is None or positive.y is None else positive.y.shape[1])
        if isinstance(x, (list, tuple)):
            x = list(x)
            for item in x:
                self._check_inputs(item[None], positive, negative, channels, batch=len(x))
        else:
            self._check_inputs(x, positive, negative, channels)
        return self._run(dict(kind="forward", noise=x, timestep=torch.as_tensor(timestep, dtype=torch.float32),
                              positive=positive, negative=negative, cfg=cfg), degrees, None, None)

    def _check_inputs(self, x, positive, negative, channels=16, batch=None):
        """Errors the workers would hit, raised here so the group survives them."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != channels:
            raise ValueError(f"The latents must be a [B, {channels}, F, H, W] tensor; got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
        batch = x.shape[0] if batch is None else batch
        if positive is None:
            raise ValueError("positive conditioning is required.")
        for name, cond in (("positive", positive), ("negative", negative)):
            if cond is not None and not isinstance(cond, Conditioning):
                raise TypeError(f"{name} must be a wanvideo.sampling.loop.Conditioning; got {type(cond).__name__}.")
            if cond is not None and len(cond.context) != batch:
                raise ValueError(f"{name}.context has {len(cond.context)} text embeddings for a batch of {batch} "
                                 "videos; give one per video.")
        if self.info.model_type != "t2v" and (positive.clip_fea is None or positive.y is None):
            raise ValueError(f"{self.info.path!r} is a {self.info.model_type} model: positive needs clip_fea (CLIP "
                             "image tokens) and y (mask and image latents).")

    def _run(self, fields, degrees, callback, check_interrupt):
        if fields["cfg"] != 1 and fields["negative"] is None:
            raise ValueError(f"cfg={fields['cfg']} needs a negative Conditioning; pass one, or set cfg to 1.0.")
        degrees = degrees or self.degrees
        if degrees is not None:
            degrees.check(self.world_size)
        if self._group is not None and self._group.dead_workers():  # died between runs: nothing is lost
            logger.warning("A Wan worker exited since the last run (%s); starting a fresh group.",
                           self._failure_report("idle"))
            group, self._group = self._group, None
            group.stop(graceful=False)
        self.start()
        self._request_id += 1
        request = detached_request(request_id=self._request_id, degrees=degrees, **fields)
        payload = encode_request(request)
        group = self._group
        group.stop_event.clear()
        for request_queue in group.request_queues:
            request_queue.put(payload)

        interruption = None

        def interrupt(error):
            nonlocal interruption
            if interruption is None and error is not None:
                interruption = error
                group.stop_event.set()  # every rank sees it before its next step

        def poll_interrupt():
            if interruption is None and check_interrupt is not None:
                interrupt(self._call_user(check_interrupt, stop_on_true=True))

        last_news = time.monotonic()
        try:
            while True:
                kind, request_id, payload = self._next_message(self.step_timeout_s, last_news, "running",
                                                               poll_interrupt)
                last_news = time.monotonic()
                if kind == "error":
                    time.sleep(0.2)  # a worker killed from outside shows as exited a moment later
                    self._fail(self._failure_report("running", payload))
                if request_id != request.request_id:
                    continue  # late news of an earlier, interrupted request
                if kind == "result":  # private copies: the shared memory belongs to the worker
                    if interruption is not None:  # finished before the stop was seen: still cancelled
                        raise interruption
                    return [t.clone() for t in payload] if isinstance(payload, list) else payload.clone()
                if kind == "interrupted":
                    raise interruption or InterruptedError("The Wan workers were interrupted.")
                if kind == "progress" and callback is not None and interruption is None:
                    interrupt(self._call_user(callback, *payload))
                poll_interrupt()
        except KeyboardInterrupt:
            group.stop_event.set()
            raise

    @staticmethod
    def _call_user(function, *args, stop_on_true=False):
        """Call a user callable; the exception it raises (or, for check_interrupt, a True it returns)
        becomes the interruption, re-raised once the workers have stopped."""
        try:
            if function(*args) is True and stop_on_true:
                return InterruptedError("Interrupted by check_interrupt().")
        except Exception as error:  # noqa: BLE001
            return error
        return None
