"""ComfyUI's side of a worker group: the one request loop both front ends share.

`WanWorkerClient` is what a caller sees: sample() and forward(), the input checks that keep a bad
request away from the workers (an error there would cost the whole group), and the single loop
that sends a request, relays progress, passes an interruption on, and returns the result. It
reaches its workers through a `WorkerTransport`, which each front end implements:
    DistributedWanRunner (workers.py)   spawned processes; multiprocessing queues and a shared value
    TorchrunWanClient (remote.py)       torchrun ranks; keys of rank 0's TCPStore

The loop never blocks without a bound: it polls for messages, calls `check_interrupt` between
polls, asks the transport whether a worker died or failed, and gives up after `step_timeout_s`
without news. Interruption is per request: the ranks leave the cancelled request (and any earlier
one) at the same step, while a request sent after it runs normally, so a run started right after
Ctrl-C never waits behind the cancelled one.
"""
import logging
import time

import torch

from ...sampling.loop import Conditioning, check_inputs
from .protocol import detached_request
from .topology import choose_degrees

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05


class WorkerGroupError(RuntimeError):
    """A worker failed, died or stopped answering; the group has been torn down."""


class WorkerTransport:
    """How a client reaches one worker group. Messages are (kind, request_id, payload):
        ('ready', None, (rank, {phase: seconds}))      a spawned worker has loaded its weights
        ('progress', id, (step, total, x0 or None))    after each step; x0 [B, 16, F, H, W] with previews
        ('result', id, tensor or list of tensors)      on the CPU
        ('interrupted', id, None)                      the ranks left the request at one step
        ('error', id or None, (rank, traceback text))  a rank failed (and exits)
        ('timing', id, {phase: seconds})               start-up figures ('first_step' of the first request)
    """

    def new_request_id(self):
        """A fresh request id, larger than every id this group has seen."""
        raise NotImplementedError

    def send(self, request):
        """Deliver a protocol.Request to every rank."""
        raise NotImplementedError

    def next_message(self, timeout_s):
        """The next message, or None after timeout_s without one."""
        raise NotImplementedError

    def interrupt(self, request_id):
        """Make every rank leave request `request_id` (and any earlier one) before its next step."""
        raise NotImplementedError

    def failure(self, doing, error=None):
        """None while every worker is well; else a report for people of which workers died or
        failed while `doing` (error: the (rank, traceback) of an 'error' message)."""
        raise NotImplementedError


class WanWorkerClient:
    """sample() and forward() on a worker group; the front ends provide the transport.

    A subclass sets `served` (protocol.ServedModel), `world_size`, `degrees` (a ParallelDegrees
    for every run, or None to choose per run) and `step_timeout_s`, and implements `_transport()`
    (the live transport, started or restarted if need be) and `_fail(message, timed_out)` (clean up
    what is broken and raise).
    """

    served = None
    degrees = None
    step_timeout_s = 900.0
    startup_seconds = None  # {phase: seconds} of the group's start, where the front end measures it

    @property
    def num_heads(self):
        return self.served.num_heads

    def _transport(self):
        raise NotImplementedError

    def _fail(self, message, timed_out=False):
        raise NotImplementedError

    # --- the front -----------------------------------------------------------------------------

    def degrees_for(self, cfg):
        """The layout a run of one video with this guidance scale uses (at cfg 1, a batch of 2n videos of
        one size takes the CFG split instead: cfg_parallel.splits_in_two)."""
        return self.degrees or choose_degrees(self.world_size, self.num_heads, use_cfg=cfg != 1)

    def sample(self, noise, positive, negative=None, steps=30, cfg=5.0, shift=5.0, scheduler="unipc", denoise=1.0,
               init_latent=None, batch_cfg=None, callback=None, check_interrupt=None, previews=False, degrees=None,
               inpaint=None):
        """Denoise noise [B, 16, F, H, W] -> latents [B, 16, F, H, W] float32 on the CPU.

        Arguments as wanvideo.sampling.loop.sample_video (positive / negative are Conditioning).
        callback(step_index, total_steps, x0 or None): after each step (x0 [B, 16, F, H, W] with
          previews=True). check_interrupt(): polled while waiting; raising (or returning True)
          stops every worker at its next step, and the exception propagates.
        degrees: this run's layout (default: the client's, else choose_degrees).
        """
        self._check_latents(noise, positive, negative, self.served.latent_channels or 16)
        # bad settings fail here, not in the workers
        inpaint = check_inputs(noise, positive, negative, cfg, denoise, init_latent, self.served.patch_size, steps,
                               shift, scheduler, self.served.text_dim, inpaint)
        return self._run(dict(kind="sample", latents=noise, positive=positive, negative=negative, cfg=cfg, steps=steps,
                              shift=shift, scheduler=scheduler, denoise=denoise, init_latent=init_latent,
                              inpaint_latent=None if inpaint is None else inpaint.latent,
                              inpaint_mask=None if inpaint is None else inpaint.mask,
                              batch_cfg=batch_cfg, previews=previews), degrees, callback, check_interrupt)

    def forward(self, x, timestep, positive, negative=None, cfg=1.0, degrees=None):
        """One guided evaluation: x [B, C, F, H, W], timestep [B] (0..1000) -> velocity [B, 16, F, H, W]
        (uncond + cfg * (cond - uncond); the positive branch alone at cfg 1). x may also be a list
        of [C, F_i, H_i, W_i] of different sizes (t2v; a ragged batch): then a list comes back."""
        channels = self.served.in_dim - (0 if positive is None or positive.y is None else positive.y.shape[1])
        if isinstance(x, (list, tuple)):
            x = list(x)
            for item in x:
                self._check_latents(item[None], positive, negative, channels, batch=len(x))
        else:
            self._check_latents(x, positive, negative, channels)
        if cfg != 1 and negative is None:
            raise ValueError(f"cfg={cfg} needs a negative Conditioning; pass one, or set cfg to 1.0.")
        return self._run(dict(kind="forward", latents=x, timestep=torch.as_tensor(timestep, dtype=torch.float32),
                              positive=positive, negative=negative, cfg=cfg), degrees, None, None)

    def _check_latents(self, x, positive, negative, channels=16, batch=None):
        """Errors the workers would hit that the sampling loop's check_inputs does not cover (forward
        requests; types before shapes), raised here so the group survives them."""
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
        needs = self.served.needs if self.served.needs is not None else (
            [] if self.served.model_type == "t2v" else ["clip_fea", "y"])  # workers that do not say
        missing = [name for name in needs if getattr(positive, name) is None]
        if missing:
            what = {"clip_fea": "clip_fea (CLIP image tokens)", "y": "y (mask and image latents)"}
            raise ValueError(f"{self.served.path!r} is a {self.served.model_type} model: positive needs "
                             + " and ".join(what[name] for name in needs) + ".")

    # --- the loop ------------------------------------------------------------------------------

    def _run(self, fields, degrees, callback, check_interrupt):
        """Send one request built from `fields` and wait for its result (see the module docstring)."""
        degrees = degrees or self.degrees
        if degrees is not None:
            degrees.check(self.world_size)
        transport = self._transport()
        request = detached_request(request_id=transport.new_request_id(), degrees=degrees, **fields)
        transport.send(request)
        interruption = None

        def interrupt(error):
            nonlocal interruption
            if interruption is None and error is not None:
                interruption = error
                transport.interrupt(request.request_id)  # every rank leaves at the same step

        def poll_interrupt():
            if interruption is None and check_interrupt is not None:
                interrupt(_call_user(check_interrupt, stop_on_true=True))

        last_news = time.monotonic()
        try:
            while True:
                kind, request_id, payload = self._next_message(transport, self.step_timeout_s, last_news, "running",
                                                               poll_interrupt)
                last_news = time.monotonic()
                if kind == "timing":
                    self.startup_seconds = dict(self.startup_seconds or {}, **payload)
                    continue
                if request_id != request.request_id:
                    continue  # late news of an earlier, cancelled request
                if kind == "result":
                    if interruption is not None:  # finished before the stop was seen: still cancelled
                        raise interruption
                    # Private copies: a spawned worker's tensors arrive in shared memory it owns.
                    return [t.clone() for t in payload] if isinstance(payload, list) else payload.clone()
                if kind == "interrupted":
                    raise interruption or InterruptedError("The Wan workers were interrupted.")
                if kind == "progress" and callback is not None and interruption is None:
                    interrupt(_call_user(callback, *payload))
                poll_interrupt()
        except KeyboardInterrupt:
            # Cancel this request only, without waiting: the ranks drop it at their next step, and a
            # request sent after it is not affected, so the next run starts at once.
            try:
                transport.interrupt(request.request_id)
            except Exception as error:  # noqa: BLE001 - the transport may be gone; Ctrl-C goes on
                logger.warning("Could not pass the interruption on to the Wan workers: %s", error)
            raise

    def _next_message(self, transport, timeout_s, since, doing, idle=None):
        """The next message from `transport`; fails (self._fail) on a worker's error, a dead worker,
        or after timeout_s without news since `since`. idle(): called between polls."""
        while True:
            message = transport.next_message(POLL_INTERVAL_S)
            if message is not None and message[0] == "error":
                time.sleep(0.2)  # a worker killed from outside shows as exited a moment later
                self._fail(transport.failure(doing, message[2]))
            if message is not None:
                return message
            if idle is not None:
                idle()
            report = transport.failure(doing)
            if report:
                self._fail(report)
            if time.monotonic() - since > timeout_s:
                self._fail(f"The Wan workers sent nothing for {timeout_s:.0f} s while {doing}; a worker hangs "
                           "(or one step takes longer: raise step_timeout_s).", timed_out=True)


def _call_user(function, *args, stop_on_true=False):
    """Call a user callable; the exception it raises (or, for check_interrupt, a True it returns)
    becomes the interruption, re-raised once the workers have stopped."""
    try:
        if function(*args) is True and stop_on_true:
            return InterruptedError("Interrupted by check_interrupt().")
    except Exception as error:  # noqa: BLE001
        return error
    return None
