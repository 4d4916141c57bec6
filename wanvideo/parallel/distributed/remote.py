"""ComfyUI's side of a worker group started by torchrun (see worker.py for the store protocol).

`TorchrunWanClient` is the shared client (client.py: sample, forward, input checks, the request
loop) over `_StoreTransport`, which speaks the keys of rank 0's TCPStore.
"""
import logging
import time
from datetime import timedelta

import torch.distributed as dist

from .client import POLL_INTERVAL_S, WanWorkerClient, WorkerGroupError, WorkerTransport
from .protocol import ServedModel, decode_tensor, detached_request, encode_request
from .worker import request_key

logger = logging.getLogger(__name__)


class _StoreTransport(WorkerTransport):
    """Requests, progress, results and interruptions as keys of rank 0's store (one client at a time)."""

    def __init__(self, store, where):
        self.store, self.where = store, where
        self._request_id, self._progress = None, None

    def new_request_id(self):
        return self.store.add("requests", 1)  # the ranks read request/1, request/2, ... in order

    def send(self, request):
        self._request_id, self._progress = request.request_id, None
        self.store.set(request_key("request", request.request_id), encode_request(request))

    def next_message(self, timeout_s):
        n = self._request_id
        if n is not None:
            if self.store.check([request_key("interrupted", n)]):
                return "interrupted", n, None
            if self.store.check([request_key("progress", n)]):  # before the result: the last step's news first
                progress = self.store.get(request_key("progress", n))  # "step total", overwritten every step
                if progress != self._progress:
                    self._progress = progress
                    step, total = map(int, progress.split())
                    return "progress", n, (step - 1, total, None)
            if self.store.check([request_key("result", n)]):
                result = decode_tensor(self.store.get(request_key("result", n)))
                self.store.delete_key(request_key("result", n))
                return "result", n, result
        time.sleep(timeout_s)
        return None

    def interrupt(self, request_id):
        if not self.store.check([request_key("interrupt", request_id)]):
            self.store.set(request_key("interrupt", request_id), "1")

    def failure(self, doing, error=None):
        if not self.store.check(["error"]):
            return None
        return (f"A Wan worker at {self.where} failed while {doing}; restart the torchrun job.\n"
                + self.store.get("error").decode(errors="replace"))


class TorchrunWanClient(WanWorkerClient):
    """Sends requests to `python -m wanvideo.parallel.distributed.worker` ranks through rank 0's store.

    host, port: rank 0's --serve-host / --serve-port. connect_timeout_s: how long to wait for the
    store and for every rank to load its weights; step_timeout_s: the longest silence during a run.
    Requests are checked here as DistributedWanRunner checks them (the workers publish their
    checkpoint's facts), so a bad request never reaches, and never ends, the torchrun job. A
    worker's failure raises WorkerGroupError (a RuntimeError), silence TimeoutError.
    """

    def __init__(self, host, port=29510, connect_timeout_s=900.0, step_timeout_s=900.0):
        self.host, self.port, self.step_timeout_s = host, port, step_timeout_s
        began = time.monotonic()
        try:
            self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=connect_timeout_s))
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise ConnectionError(f"No Wan worker group answers at {host}:{port} ({error}). Start it with torchrun "
                                  "(MULTI_GPU_GUIDE.md, section 5) and check --serve-port and the firewall.") from error
        self._store_transport = _StoreTransport(self.store, f"{host}:{port}")
        while not self.store.check(["ready"]):
            report = self._store_transport.failure("loading the model")
            if report:
                raise WorkerGroupError(report)
            if time.monotonic() - began > connect_timeout_s:
                raise TimeoutError(f"The Wan workers at {host}:{port} did not finish loading in "
                                   f"{connect_timeout_s:.0f} s.")
            time.sleep(POLL_INTERVAL_S)
        self.world_size = int(self.store.get("ready"))
        self.served = ServedModel.from_json(self.store.get("model").decode())

    def sample(self, noise, positive, negative=None, steps=30, cfg=5.0, shift=5.0, scheduler="unipc", denoise=1.0,
               init_latent=None, batch_cfg=None, callback=None, check_interrupt=None, degrees=None, inpaint=None):
        """As DistributedWanRunner.sample (without previews: callback gets x0 None): latents
        [B, 16, F, H, W] float32 on the CPU."""
        return super().sample(noise, positive, negative, steps=steps, cfg=cfg, shift=shift, scheduler=scheduler,
                              denoise=denoise, init_latent=init_latent, batch_cfg=batch_cfg, callback=callback,
                              check_interrupt=check_interrupt, degrees=degrees, inpaint=inpaint)

    def shutdown_workers(self):
        """Ask every rank to exit (the torchrun job then ends)."""
        n = self.store.add("requests", 1)
        self.store.set(request_key("request", n), encode_request(detached_request(kind="shutdown", request_id=n)))

    def _transport(self):
        return self._store_transport

    def _fail(self, message, timed_out=False):
        """Nothing to tear down here: a failed rank ends the torchrun job."""
        where = f"The Wan workers at {self.host}:{self.port}"
        if timed_out:
            raise TimeoutError(message.replace("The Wan workers", where) + " Restart the torchrun job.")
        raise WorkerGroupError(message)
