"""Data parallelism: one replica of the model per device, each forward's batch split across them.

CFG's cond and uncond (the sampler sends them as one batch to a model that `prefers_batched_cfg`)
and batch items run on different devices at the same time; the results come back to the first
device. Replicas on the same device share one model, so [cuda:0, cuda:0] costs no extra memory.
"""
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from ..devices import device_context

logger = logging.getLogger(__name__)


def split_evenly(count, parts):
    """[0, count) -> `parts` contiguous (start, stop) ranges whose sizes differ by at most one."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class DataParallelWan:
    """Calls like a WanModel (the official forward signature) and runs on several replicas.

    replicas: one WanModel per device, in the order of `devices` (the same object may repeat). The
    first device is the main one: inputs may live anywhere, outputs come back there.
    """
    prefers_batched_cfg = True

    def __init__(self, replicas, devices):
        if not replicas or len(replicas) != len(devices):
            raise ValueError(f"data parallelism needs one replica per device; got {len(replicas)} replicas for "
                             f"{len(devices)} devices.")
        self.replicas, self.devices = list(replicas), [torch.device(d) for d in devices]
        self.device = self.devices[0]
        self.patch_size = self.replicas[0].patch_size
        self._pool = ThreadPoolExecutor(max_workers=len(self.replicas), thread_name_prefix="wan-data-parallel")

    def __call__(self, x, t, context, seq_len=None, clip_fea=None, y=None):
        x = list(x)
        batch = len(x)
        images_per_item = clip_fea.shape[0] // batch if clip_fea is not None else 0
        jobs = []
        for replica, device, (start, stop) in self._assignments(batch):
            part = dict(
                x=[u.to(device, non_blocking=True) for u in x[start:stop]],
                t=(t.reshape(-1).expand(batch) if t.numel() == 1 else t)[start:stop].to(device),
                context=[c.to(device, non_blocking=True) for c in context[start:stop]], seq_len=seq_len,
                clip_fea=None if clip_fea is None else
                clip_fea[start * images_per_item:stop * images_per_item].to(device, non_blocking=True),
                y=None if y is None else [u.to(device, non_blocking=True) for u in y[start:stop]])
            jobs.append(self._pool.submit(self._run, replica, device, part))
        outputs = []
        for job in jobs:  # in batch order; an exception on any replica propagates here
            outputs.extend(job.result())
        return [u.to(self.device) for u in outputs]

    def _assignments(self, batch):
        """(replica, device, (start, stop)) per job: an even split over the devices, with the shares of
        a replica listed on several devices joined (one model object runs one batch at a time)."""
        jobs = []
        for replica, device, (start, stop) in zip(self.replicas, self.devices, split_evenly(batch, len(self.replicas))):
            if start == stop:
                continue
            if jobs and jobs[-1][0] is replica:
                jobs[-1] = (replica, device, (jobs[-1][2][0], stop))
            else:
                jobs.append((replica, device, (start, stop)))
        return jobs

    @staticmethod
    def _run(replica, device, part):
        with torch.inference_mode(), device_context(device):
            return replica(**part)

    def close(self):
        self._pool.shutdown(wait=True)

    def describe(self):
        return "data parallel: a replica on each of " + ", ".join(str(d) for d in self.devices)

