"""The 'distributed' strategy as a WanPipeline: the loader node's output, sampled in worker processes.

The worker group starts at load time (each worker loads its own weights from the file) and lives
across runs until the pipeline is unloaded or garbage-collected, when the workers stop and their
GPU memory is returned.
"""
import logging

import torch

from ...pipeline import WanPipeline
from .topology import ParallelDegrees
from .workers import DistributedWanRunner

logger = logging.getLogger(__name__)


class DistributedWanPipeline(WanPipeline):
    """generate() runs the whole denoising loop in the workers; rank 0 returns the latents."""

    def __init__(self, runner, settings):
        super().__init__(None, runner.info, runner.devices[0], settings,
                         placement=f"distributed: one worker per device on {', '.join(map(str, runner.devices))}; "
                                   f"layout {runner.degrees or 'chosen per run (cfg x ulysses x ring)'}")
        self.runner = runner
        self.add_cleanup(runner.shutdown)

    def generate(self, noise, positive, negative=None, progress=True, **sampler_args):
        if self.runner is None:
            raise RuntimeError("This model was unloaded; run the loader node again.")
        self.runner.start()  # no-op while the group is alive; a fresh group after a failure
        return self.runner.sample(noise, positive, negative, **sampler_args)

    def unload(self):
        super().unload()
        self.runner = None


def load_distributed_pipeline(path, devices, settings, degrees=None):
    """Start one worker per device on `path` -> DistributedWanPipeline. degrees: (ulysses, ring, cfg)
    from the planner, or None to choose per run."""
    if settings.loras or (settings.block_swap and settings.block_swap.blocks_to_swap) or settings.compile_args:
        logger.warning("The distributed strategy does not apply LoRAs, block swap or compile settings yet; "
                       "they are ignored. Use data_parallel or block_distribution to combine them.")
    layout = None
    if degrees and all(d for d in degrees):
        ulysses, ring, cfg = degrees
        if ulysses * ring * cfg == len(devices):
            layout = ParallelDegrees(cfg=cfg, ulysses=ulysses, ring=ring)
    runner = DistributedWanRunner(path, [torch.device(d) for d in devices], base_precision=settings.base_precision,
                                  quantization=settings.quantization, attention_mode=settings.attention_mode,
                                  degrees=layout)
    runner.start()
    return DistributedWanPipeline(runner, settings)
