"""One rank's side of a worker group: its own copy of the model, the layouts, and request handling.

The same `WorkerSession` serves spawned workers (workers.py) and workers started by torchrun
(worker.py); only the way requests arrive and results leave differs. Every rank loads its weights
with the one load sequence, wanvideo.pipeline.load_prepared_model.
"""
import logging

import torch
import torch.distributed as dist

from ...pipeline import LoadSettings, load_prepared_model
from ...sampling.loop import sample_video
from .cfg_parallel import GuidedVelocityModel, splits_in_two
from .sequence_parallel import apply_sequence_parallel
from .sharding import load_sharded_model
from .topology import ParallelGroups, choose_degrees

logger = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """Raised on every rank, at the same step, when any rank was asked to stop."""


class WorkerSession:
    """Loads the model on this rank's device and runs requests, all ranks in step.

    Process groups for a layout are built once, on first use, and kept: every rank sees the same
    sequence of requests, so the collective `new_group` calls match.
    """

    def __init__(self, checkpoint_path, device, settings: LoadSettings, shard_weights=False):
        """settings: precision, quantization (fp8 fast matmuls included), attention and LoRAs (merged
        by every rank from the files); a distributed group neither swaps blocks nor compiles.
        shard_weights: each rank keeps 1/N of every weight and gathers a block as it runs
        (sharding.py); every rank of the world must agree on it."""
        if settings.swaps_blocks or settings.compile_args is not None:
            raise ValueError("Distributed workers keep their weights on their device: block swap and "
                             "torch.compile are not supported here.")
        self.device = torch.device(device)
        self.shard_report = None
        if shard_weights:
            self.model, self.info, self.shard_report = load_sharded_model(checkpoint_path, self.device, settings)
        else:
            self.model, self.info, _ = load_prepared_model(checkpoint_path, self.device, settings)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Collectives on the default group need tensors where its backend works: GPU for NCCL.
        self.comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self._groups = {}
        self._applied = None

    def layout(self, degrees, cfg, halves=False):
        """ParallelGroups for `degrees` (or the automatic choice for this cfg), applied to the model.
        halves: the batch can be halved between two CFG groups (cfg_parallel.splits_in_two), which
        at cfg 1 then share it as at cfg > 1 they share the branches."""
        use_cfg = cfg != 1 or halves
        degrees = degrees or choose_degrees(self.world_size, self.model.num_heads, use_cfg=use_cfg)
        if degrees not in self._groups:
            self._groups[degrees] = ParallelGroups(degrees, self.rank, self.world_size)
        groups = self._groups[degrees]
        if self._applied != degrees:
            apply_sequence_parallel(self.model, groups)
            self._applied = degrees
            if self.rank == 0:
                logger.info("Worker group layout: %s", degrees)
        return groups

    def any_rank(self, flag):
        """True on every rank when `flag` is true on any rank (one tiny all-reduce; none for one rank)."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    @torch.no_grad()
    def run(self, request, stop_requested, on_step=None):
        """Run a 'sample' or 'forward' Request on this rank; every rank returns the same result.

        stop_requested(): this rank's local wish to stop (checked before every step; the ranks agree
          through `any_rank`, so all of them leave at the same step: RunInterrupted).
        on_step(step_index, total_steps, x0): called after each step.
        """
        groups = self.layout(request.degrees, request.cfg, splits_in_two(list(request.latents)))
        guided = GuidedVelocityModel(self.model, groups, request.negative, request.cfg)
        if request.kind == "forward":
            if self.any_rank(stop_requested()):
                raise RunInterrupted()
            x = [u.to(self.device) for u in request.latents]
            positive = request.positive
            out = guided(x, request.timestep.to(self.device), [c.to(self.device) for c in positive.context],
                         clip_fea=None if positive.clip_fea is None else positive.clip_fea.to(self.device),
                         y=None if positive.y is None else list(positive.y.to(self.device, torch.float32)))
            out = [o.cpu() for o in out]
            return out if isinstance(request.latents, list) else torch.stack(out)

        def check_interrupt():
            if self.any_rank(stop_requested()):
                raise RunInterrupted()

        if groups.degrees.cfg == 2:  # the wrapper guides across the CFG groups; the loop sees cfg 1
            model, negative, cfg = guided, None, 1.0
        else:
            model, negative, cfg = self.model, request.negative, request.cfg
        return sample_video(model, request.latents, request.positive, negative, steps=request.steps, cfg=cfg,
                            shift=request.shift, scheduler=request.scheduler, denoise=request.denoise,
                            init_latent=request.init_latent, batch_cfg=request.batch_cfg, callback=on_step,
                            inpaint=None if request.inpaint_latent is None else (request.inpaint_latent,
                                                                                 request.inpaint_mask),
                            check_interrupt=check_interrupt, progress=False)
