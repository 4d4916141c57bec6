"""A group of worker processes, one per device, started from ComfyUI's single process.

`DistributedWanRunner` starts one process per listed device (torch.multiprocessing: from a
forkserver that has torch imported already, or spawned where there is no forkserver, on Windows),
joins them with torch.distributed (NCCL on GPUs, gloo on CPU and for a group of one GPU) through a
free TCP port on 127.0.0.1, and lets every worker load its own copy of the weights from the checkpoint file
(wanvideo.pipeline.load_prepared_model; the model never travels through a pipe). Requests go to
every worker through its own queue, as safetensors bytes (protocol.py); the denoising loop runs
inside the workers; rank 0 sends progress and the result back on one queue. The request loop,
the input checks and the failure handling are the shared client's (client.py); `_WorkerGroup` is
its transport here.

A worker imports nothing of the parent but this package, found by its location (spawn_entry.py):
ComfyUI's main.py (which would start a second ComfyUI) and the custom-node name under which
ComfyUI imported this package never reach it.

Start-up is timed by phase (STARTUP_PHASES; `DistributedWanRunner.startup_seconds`, logged at INFO),
so a slow start says where it went (benchmarks/bench_startup.py prints them).

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
# A worker's start-up, in order (seconds of each in DistributedWanRunner.startup_seconds):
#   spawn            the process starts, until spawn_entry runs (under a forkserver: a fork, plus the
#                    forkserver's own start and preloaded imports the first time)
#   imports          torch (unless preloaded) and this package
#   cuda_init        the CUDA context on the worker's GPU (0 on CPU)
#   process_group    torch.distributed's rendezvous (NCCL connects later, at the first collective)
#   weights          the weights read from the file onto the device, LoRAs merged (or the shards)
STARTUP_PHASES = ("spawn", "imports", "cuda_init", "process_group", "weights")

__all__ = ["DistributedWanRunner", "WorkerGroupError", "worker_main", "STARTUP_PHASES", "warm_up_worker_context", "free_port"]


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
                cancelled_through, cpu_threads, collective_timeout_s, launch=None, entered_at=None):
    """One spawned worker (rank): joins the group, loads the model, sends ('ready', None, (rank,
    phases)), then serves encoded requests from request_queue until None arrives. device: a string
    ('cuda:0', 'cpu'). load_args: plain values (checkpoint_path and LoadSettings fields): the parent
    may know our classes under another name. cancelled_through: a shared integer; a request whose
    id is at most its value is cancelled. launch: {'at': the parent's time.time() when the group
    started, 'environ': the parent's environment then}; entered_at: time.time() when spawn_entry
    began. phases: seconds of each start-up phase (STARTUP_PHASES), consecutive from launch['at']."""
    launch = launch or {}
    if launch.get("environ") is not None:
        _adopt_environment(launch["environ"])
    logging.basicConfig(level=logging.INFO, format=f"[wan worker {rank}] %(levelname)s %(name)s: %(message)s")
    clock = _PhaseClock(launch.get("at"), entered_at)
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    device = torch.device(device)
    request_id = None
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.empty(1, device=device)  # creates the context now, so the phase says what it costs
        clock.lap("cuda_init")
        # No device_id: NCCL stays lazy and connects at the first collective (in 'first_step'). Binding
        # the device would connect here, but also switch new_group to communicator splits, an untested
        # path for the layouts' groups; a group of one has no NCCL at all (_backend).
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        clock.lap("process_group")
        settings = dict(load_args)
        session = WorkerSession(settings.pop("checkpoint_path"), device, shard_weights=settings.pop("shard_weights"),
                                settings=LoadSettings(**settings))
        clock.lap("weights")
        message_queue.put(("ready", None, (rank, clock.phases)))
        seconds = _import_compiler(device)
        if seconds is not None and rank == 0:
            message_queue.put(("timing", None, {"compiler_imports": seconds}))
        first_step_timed = False
        while (payload := _next_request(request_queue)) is not None:
            received = time.monotonic()
            request = decode_request(payload)
            request_id = request.request_id

            def report_first_step():
                # The first step of the first request: layout, kernels built for the shape, one step.
                nonlocal first_step_timed
                if rank == 0 and not first_step_timed:
                    first_step_timed = True
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # the step's kernels done, not only queued
                    message_queue.put(("timing", request_id, {"first_step": time.monotonic() - received}))

            def on_step(step, total, x0):
                if rank == 0:
                    report_first_step()
                    preview = x0.detach().to("cpu", torch.float32).clone() if request.previews else None
                    message_queue.put(("progress", request_id, (step, total, preview)))

            try:
                result = session.run(request, lambda: cancelled_through.value >= request_id, on_step)
            except RunInterrupted:
                if rank == 0:
                    message_queue.put(("interrupted", request_id, None))
                continue
            if rank == 0:
                report_first_step()  # a 'forward' request has no steps: its one evaluation counts
                to_cpu = lambda t: t.detach().to("cpu").clone()  # noqa: E731
                message_queue.put(("result", request_id,
                                   [to_cpu(t) for t in result] if isinstance(result, list) else to_cpu(result)))
    except BaseException:
        message_queue.put(("error", request_id, (rank, traceback.format_exc())))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _import_compiler(device):
    """On a GPU, import torch.compile's machinery now, between 'ready' and the first request: the
    model's fused kernels are compiled on the first step (wanvideo.modules.lazy_compile), whose
    imports take a second or two in a fresh process. The host usually has other work first (text
    encoding), so this goes unseen there; otherwise the first request waits for it (first_step
    starts when a request is taken). Never fatal: the first step would import it again.
    -> the seconds it took, or None where nothing is compiled (CPU)."""
    if device.type != "cuda":
        return None  # fused kernels compile for CUDA tensors only
    began = time.monotonic()
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401
    except Exception as error:  # noqa: BLE001 - only an early start of what the first step does
        logger.debug("Early import of the compiler failed: %s", error)
    return time.monotonic() - began


def _adopt_environment(environ):
    """Take the parent's environment as it was at the group's start. A forkserver child inherits
    the forkserver's, which is the parent's of an earlier moment (CUDA_VISIBLE_DEVICES, NCCL_*,
    TORCH_* may have changed since); a spawned child has it already. Only what is read after this
    point follows: variables the preloaded libraries read at their import (OpenMP's thread count,
    say) keep the forkserver's values; the worker sets its thread count itself."""
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    os.environ.update(environ)


class _PhaseClock:
    """Consecutive start-up phases of one worker, in seconds, on the wall clock the parent shares
    (time.time(): the same clock in every process of the machine)."""

    def __init__(self, launched_at, entered_at):
        self.phases = {}
        self._last = time.time() if launched_at is None else launched_at
        if launched_at is not None and entered_at is not None:
            self.lap("spawn", entered_at)  # process start, until spawn_entry runs
        self.lap("imports")                # torch (unless preloaded) and this package

    def lap(self, phase, now=None):
        now = time.time() if now is None else now
        self.phases[phase] = max(0.0, now - self._last)
        self._last = now


# --- the parent side ------------------------------------------------------------------------------

def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on (a process group's rendezvous)."""
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


# Modules the forkserver imports once, so each worker forks with them in place instead of importing
# them again (torch alone is most of a worker's start on a warm machine). Only what the parent has
# imported already (so it imports cleanly here), and nothing that may set up CUDA or start threads
# or processes at import (a worker forked after that could not use CUDA, or could deadlock): so not
# torch._dynamo / torch._inductor (inductor may start its compile-worker pool). accelerate checks
# CUDA through NVML only, to stay fork-safe (its notebook launcher forks). Our own package is not
# among them: the worker imports it under its own name from its own folder (spawn_entry.py),
# which the forkserver cannot know.
FORKSERVER_PRELOAD = ("torch", "torch.distributed", "safetensors.torch", "numpy", "yaml", "accelerate")


def worker_context():
    """The multiprocessing context workers start from: a forkserver with FORKSERVER_PRELOAD where
    the platform has one (Linux, macOS), else spawn (Windows). The forkserver is one per parent
    process, started on first use and kept until the parent exits, so only the first group of a
    session pays for its imports; later groups (a restart after step_aside, a failure, another
    model) fork from it at once."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return torch_mp.get_context("spawn")
    context = torch_mp.get_context("forkserver")
    # Takes effect when the forkserver starts; one that runs already (ours, or another library's)
    # is used as it is, which is only slower.
    context.set_forkserver_preload([name for name in FORKSERVER_PRELOAD if name in sys.modules])
    return context


def warm_up_worker_context():
    """Start the forkserver now, in the background (its imports run while the caller goes on), so a
    group started later forks at once. Harmless to call more than once, and a no-op with spawn."""
    context = worker_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver
        with _main_module_hidden():
            forkserver.ensure_running()


@contextlib.contextmanager
def _main_module_hidden():
    """Keep spawn (and the forkserver, which prepares its children the same way) from re-running
    the parent's __main__ (ComfyUI's main.py) in the workers."""
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

    def __init__(self, devices, load_args, cpu_threads, collective_timeout_s, launched_at):
        context = worker_context()
        backend = _backend(devices, load_args["shard_weights"])
        launch = {"at": launched_at, "environ": dict(os.environ)}
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.message_queue = context.Queue()
        self.request_queues = [context.Queue() for _ in devices]
        # Per-request stop: a cancelled id stays cancelled, and a later request is never stopped by
        # it, so nothing has to be cleared (and raced) before the next request.
        self.cancelled_through = context.Value("q", 0)
        self.processes = []
        self._last_request_id = 0
        entry = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawn_entry.py")
        for rank, device in enumerate(devices):
            # The device as a string: unpickling a torch.device would import torch before spawn_entry
            # has put this package's folder first on sys.path (and hide that cost in the spawn phase).
            worker_args = (rank, len(devices), init_method, backend, str(device), load_args,
                           self.request_queues[rank], self.message_queue, self.cancelled_through, cpu_threads,
                           collective_timeout_s, launch)
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


def _backend(devices, shard_weights):
    """gloo for CPU workers and for a group of one unsharded GPU worker, else NCCL. A group of one
    sends nothing between ranks (every layout is 1 x 1 x 1: no sequence or CFG collectives), so
    NCCL's communicator set-up would be pure start-up cost; a sharded group keeps NCCL, since FSDP
    gathers GPU tensors even over one rank, which gloo cannot."""
    if devices[0].type != "cuda" or (len(devices) == 1 and not shard_weights):
        return "gloo"
    return "nccl"


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
        warm_up_worker_context()  # the forkserver's imports overlap the checks and planning below
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
        # Set by start(): STARTUP_PHASES and until_ready; then, from rank 0, compiler_imports (GPU) and
        # first_step as they happen (client.py takes them during runs).
        self.startup_seconds = None

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
        began, launched_at = time.monotonic(), time.time()
        self.startup_seconds = None
        self._group = group = _WorkerGroup(self.devices, self.load_args, self.cpu_threads_per_worker,
                                           self.collective_timeout_s, launched_at)
        ready, slowest, later = set(), {}, {}
        try:
            while len(ready) < self.world_size:
                kind, _, payload = self._next_message(group, self.start_timeout_s, began, "loading the model")
                if kind == "ready":
                    rank, slowest = payload  # the last rank to be ready sets the group's pace
                    ready.add(rank)
                elif kind == "timing":  # rank 0's work after its 'ready' (compiler_imports)
                    later.update(payload)
        except KeyboardInterrupt:
            self._group = None
            group.stop(graceful=False)
            raise
        # The slowest rank's phases (consecutive, from launched_at) and the wall time the parent saw;
        # 'first_step' joins them when the first request's first step is done (client.py).
        self.startup_seconds = dict(slowest, until_ready=time.time() - launched_at, **later)
        logger.info("Wan workers ready in %.1f s (%s)", self.startup_seconds["until_ready"],
                    ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in slowest.items()))

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
