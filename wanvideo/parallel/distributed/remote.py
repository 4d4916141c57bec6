"""ComfyUI's side of a worker group started by torchrun (see worker.py for the store protocol)."""
import logging
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .protocol import decode_tensor, detached_request, encode_request
from .worker import request_key

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05


class TorchrunWanClient:
    """Sends requests to `python -m wanvideo.parallel.distributed.worker` ranks through rank 0's store.

    host, port: rank 0's --serve-host / --serve-port. connect_timeout_s: how long to wait for the
    store and for every rank to load its weights; step_timeout_s: the longest silence during a run.
    """

    def __init__(self, host, port=29510, connect_timeout_s=900.0, step_timeout_s=900.0):
        self.host, self.port, self.step_timeout_s = host, port, step_timeout_s
        began = time.monotonic()
        try:
            self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=connect_timeout_s))
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise ConnectionError(f"No Wan worker group answers at {host}:{port} ({error}). Start it with torchrun "
                                  "(MULTI_GPU_GUIDE.md, section 5) and check --serve-port and the firewall.") from error
        while not self.store.check(["ready"]):
            self._raise_worker_error()
            if time.monotonic() - began > connect_timeout_s:
                raise TimeoutError(f"The Wan workers at {host}:{port} did not finish loading in "
                                   f"{connect_timeout_s:.0f} s.")
            time.sleep(POLL_INTERVAL_S)
        self.world_size = int(self.store.get("ready"))

    def _raise_worker_error(self):
        if self.store.check(["error"]):
            raise RuntimeError(f"A Wan worker at {self.host}:{self.port} failed; restart the torchrun job.\n"
                               + self.store.get("error").decode(errors="replace"))

    def sample(self, noise, positive, negative=None, steps=30, cfg=5.0, shift=5.0, scheduler="unipc", denoise=1.0,
               init_latent=None, batch_cfg=None, callback=None, check_interrupt=None, degrees=None):
        """As DistributedWanRunner.sample (without previews): latents [B, 16, F, H, W] float32 on the CPU."""
        return self._run(dict(kind="sample", noise=noise, positive=positive, negative=negative, cfg=cfg, steps=steps,
                              shift=shift, scheduler=scheduler, denoise=denoise, init_latent=init_latent,
                              batch_cfg=batch_cfg, degrees=degrees), callback, check_interrupt)

    def forward(self, x, timestep, positive, negative=None, cfg=1.0, degrees=None):
        """As DistributedWanRunner.forward: velocity [B, 16, F, H, W]."""
        return self._run(dict(kind="forward", noise=x, timestep=torch.as_tensor(timestep, dtype=torch.float32),
                              positive=positive, negative=negative, cfg=cfg, degrees=degrees), None, None)

    def shutdown_workers(self):
        """Ask every rank to exit (the torchrun job then ends)."""
        n = self.store.add("requests", 1)
        self.store.set(request_key("request", n), encode_request(detached_request(kind="shutdown", request_id=n)))

    def _run(self, fields, callback, check_interrupt):
        if fields["cfg"] != 1 and fields["negative"] is None:
            raise ValueError(f"cfg={fields['cfg']} needs a negative Conditioning; pass one, or set cfg to 1.0.")
        n = self.store.add("requests", 1)
        self.store.set(request_key("request", n), encode_request(detached_request(request_id=n, **fields)))
        last_news, progress, interruption = time.monotonic(), None, None
        while True:
            if self.store.check([request_key("interrupted", n)]):
                raise interruption or InterruptedError("The Wan workers were interrupted.")
            self._raise_worker_error()
            if self.store.check([request_key("progress", n)]):
                current = self.store.get(request_key("progress", n))
                if current != progress:
                    progress, last_news = current, time.monotonic()
                    step, total = map(int, current.split())
                    if callback is not None and interruption is None:
                        interruption = _call(callback, step - 1, total, None)
            if self.store.check([request_key("result", n)]):
                result = decode_tensor(self.store.get(request_key("result", n)))
                self.store.delete_key(request_key("result", n))
                return result
            if check_interrupt is not None and interruption is None:
                interruption = _call(check_interrupt)
            if interruption is not None and not self.store.check([request_key("interrupt", n)]):
                self.store.set(request_key("interrupt", n), "1")
            if time.monotonic() - last_news > self.step_timeout_s:
                raise TimeoutError(f"The Wan workers at {self.host}:{self.port} sent nothing for "
                                   f"{self.step_timeout_s:.0f} s; a worker hangs. Restart the torchrun job.")
            time.sleep(POLL_INTERVAL_S)


def _call(function, *args):
    """A user callable's exception (or a True from check_interrupt) -> the interruption to raise later."""
    try:
        if function(*args) is True and not args:
            return InterruptedError("Interrupted by check_interrupt().")
    except Exception as error:  # noqa: BLE001
        return error
    return None
