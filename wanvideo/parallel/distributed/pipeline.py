"""The 'distributed' strategy as a WanPipeline: the loader node's output, sampled in worker processes.

The worker group starts at load time (each worker loads its own weights from the file) and lives
across runs until the pipeline is unloaded or garbage-collected, when the workers stop and their
GPU memory is returned.
"""
import torch

from ...pipeline import WanPipeline
from .workers import DistributedWanRunner


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
        return self.runner.sample(noise, positive, negative, previews=sampler_args.get("callback") is not None,
                                  **sampler_args)

    def unload(self):
        super().unload()
        self.runner = None


def load_distributed_pipeline(path, devices, settings, degrees=None):
    """Start one worker per device on `path` (LoRAs merged in each) -> DistributedWanPipeline.
    degrees: a ParallelDegrees layout, or None to choose one per run (cfg 1 runs use every GPU for
    the sequence)."""
    if (settings.block_swap and settings.block_swap.blocks_to_swap) or settings.compile_args:
        raise ValueError("The distributed strategy keeps a whole model on every GPU and does not combine with block "
                         "swap or torch.compile yet: disconnect those settings, or use data_parallel or "
                         "block_distribution.")
    runner = DistributedWanRunner(path, [torch.device(d) for d in devices], base_precision=settings.base_precision,
                                  quantization=settings.quantization, attention_mode=settings.attention_mode,
                                  degrees=degrees, loras=settings.loras)
    runner.start()
    return DistributedWanPipeline(runner, settings)
