"""The 'distributed' strategy as a WanPipeline: the loader node's output, sampled in worker processes.

The worker group starts at load time (each worker loads its own weights from the file) and lives
across runs until the pipeline is unloaded or garbage-collected, when the workers stop and their
GPU memory is returned.

Stepping aside (the host needs the GPUs' memory) stops the worker group and coming back starts a
fresh one, which loads the weights from the file again. That is the simplest correct way: it
returns everything the workers hold (weights, CUDA contexts, NCCL buffers, the allocator's cache),
where asking them to move their weights to CPU memory would keep the contexts and buffers, need a
new request kind in the protocol, and keep several copies of the model in host RAM at once. The
cost is a reload on the next run (from the page cache when RAM allows).
"""
import logging

import torch

from ...checkpoint import resolve_dtype
from ...pipeline import WanPipeline
from .workers import DistributedWanRunner

logger = logging.getLogger(__name__)


class DistributedWanPipeline(WanPipeline):
    """generate() runs the whole denoising loop in the workers; rank 0 returns the latents."""

    def __init__(self, runner, settings):
        super().__init__(None, runner.info, runner.devices[0], settings,
                         placement=f"distributed: one worker per device on {', '.join(map(str, runner.devices))}; "
                                   f"layout {runner.degrees or 'chosen per run (cfg x ulysses x ring)'}; "
                                   + (f"weights sharded 1/{runner.world_size} per worker (FSDP2)"
                                      if runner.shard_weights else "a whole copy of the weights per worker")
                                   + f" ({runner.shard_reason})")
        self.runner = runner
        self.add_cleanup(runner.shutdown)

    def generate(self, noise, positive, negative=None, progress=True, **sampler_args):
        if self.runner is None:
            raise RuntimeError("This model was unloaded; run the loader node again.")
        self._before_run(noise, sampler_args)
        self.runner.start()  # no-op while the group is alive; a fresh group after a failure
        return self.runner.sample(noise, positive, negative, previews=sampler_args.get("callback") is not None,
                                  **sampler_args)

    def unload(self):
        super().unload()
        self.runner = None

    @property
    def is_aside(self):
        return self.runner is not None and not self.runner.started

    def step_aside(self):
        """Stop the workers (see the module docstring); the next run starts them again."""
        if self.runner is not None and self.runner.started:
            self.runner.shutdown()
            logger.info("Stepped aside: the Wan workers on %s stopped.", ", ".join(map(str, self.runner.devices)))

    def come_back(self):
        if self.runner is not None:
            self.runner.start()  # no-op while the group is alive

    def memory_by_device(self):
        """Each worker's weights (from the checkpoint header), per device."""
        if self.runner is None:
            return {}
        block_bytes, other_bytes = self.info.bytes_at(resolve_dtype(self.settings.base_precision),
                                                      self.settings.quantization)
        shards = self.runner.world_size if self.runner.shard_weights else 1
        return {device: (self.info.num_layers * block_bytes + other_bytes) // shards for device in self.runner.devices}


def load_distributed_pipeline(path, devices, settings, degrees=None, shard_weights="auto", reserve_bytes=0):
    """Start one worker per device on `path` (LoRAs merged in each) -> DistributedWanPipeline.
    degrees: a ParallelDegrees layout, or None to choose one per run (cfg 1 runs use every GPU for
    the sequence). shard_weights: 'off', 'on' or 'auto' (sharding.py; 'auto' shards when a whole
    copy plus `reserve_bytes` of activations per GPU does not fit a GPU's free memory)."""
    if (settings.block_swap and settings.block_swap.blocks_to_swap) or settings.compile_args:
        raise ValueError("The distributed strategy keeps its weights on the GPUs (whole or sharded) and does not "
                         "combine with block swap or torch.compile yet: disconnect those settings, or use "
                         "data_parallel or block_distribution.")
    runner = DistributedWanRunner(path, [torch.device(d) for d in devices], base_precision=settings.base_precision,
                                  quantization=settings.quantization, attention_mode=settings.attention_mode,
                                  degrees=degrees, loras=settings.loras, shard_weights=shard_weights,
                                  activation_reserve_bytes=reserve_bytes)
    runner.start()
    return DistributedWanPipeline(runner, settings)
