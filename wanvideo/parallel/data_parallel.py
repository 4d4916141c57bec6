"""Data parallelism: one replica of the model per device, each forward's batch split across them.

CFG's cond and uncond (the sampler sends them as one batch to a model that `prefers_batched_cfg`)
and batch items run on different devices at the same time; the results come back to the first
device. Replicas on the same device share one model, so [cuda:0, cuda:0] costs no extra memory
and runs as one replica: its shares of the batch go through one forward on one thread.
"""
import logging
from concurrent.futures import ThreadPoolExecutor, wait

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


def _items(values, ranges):
    """The entries of a per-item sequence that fall in `ranges` ((start, stop) pairs), in order."""
    return [value for start, stop in ranges for value in values[start:stop]]


def _rows(tensor, ranges, rows_per_item=1):
    """The rows of `tensor` (`rows_per_item` consecutive rows per item) of the items in `ranges`."""
    return torch.cat([tensor[start * rows_per_item:stop * rows_per_item] for start, stop in ranges])


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
        self.text_dim = getattr(self.replicas[0], "text_dim", None)  # the sampler checks the text width up front
        self._pool = ThreadPoolExecutor(max_workers=len(self.replicas), thread_name_prefix="wan-data-parallel")

    def __call__(self, x, t, context, seq_len=None, clip_fea=None, y=None):
        x = list(x)
        batch = len(x)
        images_per_item = clip_fea.shape[0] // batch if clip_fea is not None else 0
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        assignments = self._assignments(batch)
        parts = [dict(x=[u.to(device, non_blocking=True) for u in _items(x, ranges)], t=_rows(t, ranges).to(device),
                      context=[c.to(device, non_blocking=True) for c in _items(context, ranges)], seq_len=seq_len,
                      clip_fea=None if clip_fea is None else
                      _rows(clip_fea, ranges, images_per_item).to(device, non_blocking=True),
                      y=None if y is None else [u.to(device, non_blocking=True) for u in _items(y, ranges)])
                 for _, device, ranges in assignments]  # all made before any replica starts: a failed copy runs none
        jobs = [self._pool.submit(self._run, replica, device, part)
                for (replica, device, _), part in zip(assignments, parts)]
        wait(jobs)  # every replica has stopped before anything is raised: a retry must not find one still running
        errors = [job.exception() for job in jobs if job.exception() is not None]
        for error in errors[1:]:
            logger.error("Another data-parallel replica failed too: %r", error)
        if errors:
            raise errors[0]
        outputs = [None] * batch
        for (_, _, ranges), job in zip(assignments, jobs):
            for index, output in zip(_items(range(batch), ranges), job.result()):
                outputs[index] = output.to(self.device)
        return outputs

    def _assignments(self, batch):
        """(replica, device, ranges) per job: an even split of the batch over the devices, where each
        distinct replica gets ONE job with all its shares ((start, stop) ranges, joined when adjacent),
        also when it is listed on non-adjacent devices: a model object runs one forward at a time
        (block swap is not thread-safe)."""
        jobs = {}  # id(replica) -> (replica, device, ranges), in order of first appearance
        for replica, device, (start, stop) in zip(self.replicas, self.devices, split_evenly(batch, len(self.replicas))):
            if start == stop:
                continue
            ranges = jobs.setdefault(id(replica), (replica, device, []))[2]
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((start, stop))
        return list(jobs.values())

    @staticmethod
    def _run(replica, device, part):
        with torch.inference_mode(), device_context(device):
            return replica(**part)

    def close(self):
        self._pool.shutdown(wait=True)

    def describe(self):
        return "data parallel: a replica on each of " + ", ".join(str(d) for d in self.devices)

