"""A group of worker processes, one per device, started from ComfyUI's single process.

`DistributedWanRunner` spawns one process per listed device (torch.multiprocessing, spawn
context), joins them with torch.distributed (NCCL on GPUs, gloo on CPU) through a free TCP port on
127.0.0.1, and lets every worker load its own copy of the weights from the checkpoint file
(wanvideo.pipeline.load_prepared_model; the model never travels through a pipe). Requests go to
every worker through its own queue, as safetensors bytes (protocol.py); the denoising loop runs
inside the workers; rank 0 sends progress and the result back on one queue. The request loop,
the input checks and the failure handling are the shared client's (client.py); `_WorkerGroup` is
its transport here.

A worker imports nothing of the parent but this package, found by its location (spawn_entry.py):
ComfyUI's main.py (which would start a second ComfyUI) and the custom-node name under which
ComfyUI imported this package never reach it.

A dead or hung worker tears the whole group down (an error says which rank); the next run starts a
fresh group. A process that fails to start stops the ones already started at once (they would
wait for it in init_process_group for collective_timeout_s). Interruption is a shared counter:
every rank leaves any request whose id is at most its value, agreeing on the step (serving.py).
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
from ...devices import parse_devices
from ...pipeline import LoadSettings
from .client import WanWorkerClient, WorkerGroupError, WorkerTransport
from .protocol import ServedModel, decode_request, encode_request
from .serving import RunInterrupted, WorkerSession
from .sharding import resolve_shard_weights

logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0

__all__ = ["DistributedWanRunner", "WorkerGroupError", "worker_main"]


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
                cancelled_through, cpu_threads, collective_timeout_s):
    """One spawned worker (rank): joins the group, loads the model, sends ('ready', None, rank),
    then serves encoded requests from request_queue until None arrives. load_args: plain values
    (checkpoint_path and LoadSettings fields): the parent may know our classes under another name.
    cancelled_through: a shared integer; a request whose id is at most its value is cancelled."""
    logging.basicConfig(level=logging.INFO, format=f"[wan worker {rank}] %(levelname)s %(name)s: %(message)s")
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    request_id = None
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        settings = dict(load_args)
        session = WorkerSession(settings.pop("checkpoint_path"), device, shard_weights=settings.pop("shard_weights"),
                                settings=LoadSettings(**settings))
        message_queue.put(("ready", None, rank))
        while (payload := _next_request(request_queue)) is not None:
            request = decode_request(payload)
            request_id = request.request_id

            def on_step(step, total, x0):
                if rank == 0:
                    preview = x0.detach().to("cpu", torch.float32).clone() if request.previews else None
                    message_queue.put(("progress", request_id, (step, total, preview)))

            try:
                result = session.run(request, lambda: cancelled_through.value >= request_id, on_step)
            except RunInterrupted:
                if rank == 0:
                    message_queue.put(("interrupted", request_id, None))
                continue
            if rank == 0:
                to_cpu = lambda t: t.detach().to("cpu").clone()  # noqa: E731
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


class _WorkerGroup(WorkerTransport):
    """The processes and queues of one started group; the client's transport to them."""

    def __init__(self, devices, load_args, cpu_threads, collective_timeout_s):
        context = torch_mp.get_context("spawn")
        backend = "nccl" if devices[0].type == "cuda" else "gloo"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.message_queue = context.Queue()
        self.request_queues = [context.Queue() for _ in devices]
        # Per-request stop: a cancelled id stays cancelled, and a later request is never stopped by
        # it, so nothing has to be cleared (and raced) before the next request.
        self.cancelled_through = context.Value("q", 0)
        self.processes = []
        self._last_request_id = 0
        entry = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawn_entry.py")
        for rank, device in enumerate(devices):
            worker_args = (rank, len(devices), init_method, backend, device, load_args, self.request_queues[rank],
                           self.message_queue, self.cancelled_through, cpu_threads, collective_timeout_s)
            process = context.Process(target=runpy.run_path, name=f"wan-worker-{rank}", args=(entry,),
                                      kwargs=dict(init_globals={"WAN_WORKER_ARGS": worker_args},
                                                  run_name="__wan_worker__"))
            try:
                with _main_module_hidden():
                    process.start()
            except BaseException as error:
                # The ranks already started wait for this one in init_process_group: stop them now.
                _stop_processes(self.processes, self.request_queues, self.message_queue, graceful=False)
                if not isinstance(error, Exception):
                    raise
                raise WorkerGroupError(f"Could not start Wan worker rank {rank} of {len(devices)} on {device}: "
                                       f"{type(error).__name__}: {error}. The {len(self.processes)} workers "
                                       "already started were stopped; free processes or memory and run again."
                                       ) from error
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

    # --- WorkerTransport ------------------------------------------------------------------------

    def new_request_id(self):
        self._last_request_id += 1
        return self._last_request_id

    def send(self, request):
        payload = encode_request(request)
        for request_queue in self.request_queues:
            request_queue.put(payload)

    def next_message(self, timeout_s):
        try:
            return self.message_queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def interrupt(self, request_id):
        with self.cancelled_through.get_lock():
            self.cancelled_through.value = max(self.cancelled_through.value, request_id)

    def failure(self, doing, error=None):
        dead = self.dead_workers()
        if not dead and error is None:
            return None
        if error is None:  # a dying worker may have posted its traceback just now: report it with the exit codes
            try:
                kind, _, payload = self.message_queue.get(timeout=0.5)
                error = payload if kind == "error" else None
            except queue.Empty:
                pass
        lines = []
        for rank, pid, code in dead:
            if error is not None and rank == error[0]:
                continue  # its exit follows from the error below
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            lines.append(f"Wan worker rank {rank} (pid {pid}) {how} while {doing}.")
        if error is not None:
            lines.append(f"Wan worker rank {error[0]} failed while {doing}:\n{error[1]}")
        return "\n".join(lines)


def _as_devices(devices):
    """Anything wanvideo.devices.parse_devices reads -> the workers' devices, checked for a group:
    all CUDA GPUs (NCCL) or all CPU (gloo), no GPU twice, every GPU visible."""
    if devices is None or (isinstance(devices, (list, tuple)) and not devices):
        raise ValueError(f"devices must be a non-empty list of torch.device; got {devices!r}.")
    devices = parse_devices(devices)
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
    if "cuda" in kinds and not (dist.is_available() and dist.is_nccl_available()):
        raise ValueError("The distributed strategy joins its GPU workers with NCCL, which this PyTorch does not have "
                         "(Windows builds of PyTorch ship without it; gloo cannot carry the workers' GPU "
                         "all-to-alls). Use an in-process strategy, which needs no process group: data_parallel "
                         "(CFG branches or batch items on several GPUs), block_distribution (the blocks spread "
                         "over the GPUs) or expert_parallel (Wan 2.2 A14B's two experts on two GPUs); or run on "
                         "Linux (or WSL2) for 'distributed'.")
    return devices


class DistributedWanRunner(WanWorkerClient):
    """Sequence- and CFG-parallel Wan 2.1 on worker processes, one per device.

    checkpoint_path: a Wan 2.1 .safetensors file, loaded by every worker with
      wanvideo.pipeline.load_prepared_model (base_precision, quantization, attention_mode, loras);
    devices: torch.device list (or GPU ids, '0,1', ...: wanvideo.devices.parse_devices), all CUDA
      (NCCL) or all CPU (gloo; for tests);
    degrees: a ParallelDegrees for every run, or None to choose per run with choose_degrees
      (cfg 2 when guidance is on and the device count is even, then Ulysses, then ring);
    start_timeout_s: bound on process start and weight loading; step_timeout_s: bound on the time
      between two messages from the workers during a run (a step, or the first step);
    cpu_threads_per_worker: torch CPU threads of each worker (default: the cores shared out);
    shard_weights: 'off' (every worker holds a whole copy), 'on' (each holds 1/N of every weight,
      gathering each block as it runs: sharding.py) or 'auto' (on when a whole copy does not fit
      the free memory of a GPU next to activation_reserve_bytes; `shard_reason` says why).

    sample() and forward() are the shared client's (client.py). The group starts on first use,
    lives across runs and ends with shutdown(), when the runner is garbage collected, or at exit.
    Usable as a context manager.
    """

    def __init__(self, checkpoint_path, devices, base_precision="bf16", quantization="disabled",
                 attention_mode="sdpa", degrees=None, start_timeout_s=900.0, step_timeout_s=900.0,
                 cpu_threads_per_worker=None, collective_timeout_s=1800.0, loras=(), shard_weights="auto",
                 activation_reserve_bytes=0):
        self.devices = _as_devices(devices)
        self.info = inspect_checkpoint(str(checkpoint_path))
        self.served = ServedModel.from_info(self.info)
        if degrees is not None:
            degrees.check(len(self.devices))
        self.degrees = degrees
        self.load_args = dict(checkpoint_path=str(checkpoint_path), base_precision=base_precision,
                              quantization=quantization, attention_mode=attention_mode,
                              loras=[(str(path), float(strength)) for path, strength in loras])
        self.shard_weights, self.shard_reason = resolve_shard_weights(shard_weights, self.info, self.devices,
                                                                      base_precision, quantization,
                                                                      activation_reserve_bytes)
        self.load_args["shard_weights"] = self.shard_weights
        self.start_timeout_s, self.step_timeout_s = start_timeout_s, step_timeout_s
        self.collective_timeout_s = collective_timeout_s
        if cpu_threads_per_worker is None:  # share the cores out instead of every worker taking them all
            cpu_threads_per_worker = max(1, (os.cpu_count() or 1) // len(self.devices))
        self.cpu_threads_per_worker = cpu_threads_per_worker
        self._group = None

    # --- lifetime -----------------------------------------------------------------------------

    @property
    def world_size(self):
        return len(self.devices)

    @property
    def started(self):
        return self._group is not None

    def start(self):
        """Start the workers and wait until every one has loaded its weights (no-op when running).
        A failed or interrupted start leaves no worker running."""
        if self._group is not None:
            return
        logger.info("Starting %d Wan workers on %s", self.world_size, ", ".join(map(str, self.devices)))
        began = time.monotonic()
        self._group = group = _WorkerGroup(self.devices, self.load_args, self.cpu_threads_per_worker,
                                           self.collective_timeout_s)
        ready = set()
        try:
            while len(ready) < self.world_size:
                kind, _, payload = self._next_message(group, self.start_timeout_s, began, "loading the model")
                if kind == "ready":
                    ready.add(payload)
        except KeyboardInterrupt:
            self._group = None
            group.stop(graceful=False)
            raise
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

    # --- the client's hooks ---------------------------------------------------------------------

    def _transport(self):
        """The running group; a fresh one when a worker died since the last run (nothing is lost)."""
        if self._group is not None and self._group.dead_workers():
            logger.warning("A Wan worker exited since the last run (%s); starting a fresh group.",
                           self._group.failure("idle"))
            group, self._group = self._group, None
            group.stop(graceful=False)
        self.start()
        return self._group

    def _fail(self, message, timed_out=False):
        """Tear the group down (no grace: workers may be stuck in collectives) and raise."""
        if self._group is not None:
            group, self._group = self._group, None
            group.stop(graceful=False)
        raise WorkerGroupError(message + "\nThe worker group was shut down; the next run starts a fresh one.")
