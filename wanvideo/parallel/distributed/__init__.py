"""The 'distributed' strategy: sequence-parallel (Ulysses, ring) and CFG-parallel Wan 2.1 on
torch.distributed worker processes.

Forward level (inside any process group): `ParallelGroups(degrees)` lays the ranks out,
`apply_sequence_parallel(model, groups)` makes a plain WanModel shard its tokens, and
`GuidedVelocityModel` places the cond / uncond branches on the CFG groups.
Process level: `DistributedWanRunner` starts one worker per device from ComfyUI's process;
`python -m wanvideo.parallel.distributed.worker` serves the same requests under torchrun
(`TorchrunWanClient` sends them); both fronts are one client (client.py: sample, forward, input
checks, the request loop) over their own transport. `python -m wanvideo.parallel.distributed.selfcheck`
checks a machine.
"""
from .attention import SequenceParallelAttention, attention_with_lse, ring_attention
from .cfg_parallel import GuidedVelocityModel
from .sequence_parallel import SequenceParallelRunner, apply_sequence_parallel, remove_sequence_parallel
from .topology import ParallelDegrees, ParallelGroups, choose_degrees
from .remote import TorchrunWanClient
from .client import WorkerGroupError
from .workers import DistributedWanRunner

__all__ = ["ParallelDegrees", "ParallelGroups", "choose_degrees", "SequenceParallelAttention", "attention_with_lse",
           "ring_attention", "SequenceParallelRunner", "apply_sequence_parallel", "remove_sequence_parallel",
           "GuidedVelocityModel", "DistributedWanRunner", "WorkerGroupError", "TorchrunWanClient"]
