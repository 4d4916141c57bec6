"""What one denoising step costs each strategy: compute at the GPUs' speed plus traffic over their link.

The planner (plan.py, plan_sharded.py) compares the strategies that fit in memory by these
estimates, and the plan's reason quotes them. They are estimates for choosing, not measurements:

    compute    flops_per_item() of one forward / (ASSUMED_TFLOPS x the GPU's relative speed); GPUs that
               share a step (equal token shards, equal item shares) wait for the slowest of them;
    exchange   bytes each GPU sends per step / the slowest link between the GPUs (wanvideo.gpus.links):
               Ulysses' all-to-alls, 4 x (local tokens) x dim x (u - 1) / u per block (q, k, v out, the
               attention output back), and ring attention's k and v passes, 2 x (tokens / r) x
               (dim / u) x (r - 1) per block; 2 bytes a number. Not overlapped with compute (each
               block waits for its exchange);
    gather     sharded weights: each GPU receives (N - 1) / N of the weights per forward, and runs two
               forwards per step (cond, then uncond: a gather each) when CFG is on and not split over
               CFG groups (cfg_degree 1); FSDP2 gathers the next block while the current one
               computes, so a step takes the longer of the two;
    hops       block distribution: the activations (items x tokens x dim) cross each stage boundary
               (the total over the boundaries, one after the other);
    swap       blocks kept in CPU memory are uploaded once per step over the GPU's own PCIe link,
               hidden behind that stage's compute up to its length.

ASSUMED_TFLOPS is what an H100-class GPU achieves on these bf16 shapes (14B at 720p, 81 frames,
takes about 32 s per CFG step at this rate, in line with published single-GPU timings); it stands
for the fastest GPU of the inventory. A slower GPU makes compute weigh more against traffic, so
assuming a fast one errs towards the strategies that send less.
"""
import math
from dataclasses import dataclass
from typing import Optional

from ..gpus import GIB
from ..gpus.links import Link, pcie_gb_per_s, slowest_link

ASSUMED_TFLOPS = 400.0
EXCHANGE_BYTES = 2               # bf16 activations on the wire
WORKER_PROCESS_GAIN = 1.2        # worker processes (start-up, a second copy of the inputs) must win by this much


def gib(num_bytes):
    """'13.1 GiB': memory (traffic is printed in GB, the unit of the links' GB/s)."""
    return f"{num_bytes / GIB:.1f} GiB"


def gb(num_bytes):
    """'14.1 GB' (10**9 bytes): traffic, in the unit of the links' GB/s."""
    return f"{num_bytes / 1e9:.1f} GB"


def flops_per_item(footprint, tokens):
    """FLOPs of one forward of one video of `tokens` tokens: per block the Linear layers (self-attention
    q, k, v, o and cross-attention q, o: 6 dim^2; the FFN: 2 dim ffn_dim; 2 FLOPs a multiply-add),
    self-attention's scores and weighted sum (4 tokens^2 dim) and cross-attention's (4 tokens text_len dim)."""
    dim, ffn = footprint.dim, footprint.ffn_dim
    per_block = (2 * tokens * (6 * dim * dim + 2 * dim * ffn) + 4 * tokens * tokens * dim
                 + 4 * tokens * footprint.text_len * dim)
    return footprint.num_layers * per_block


@dataclass
class Estimate:
    """One strategy's step: seconds in all, of which compute and traffic, and what was sent over which link."""
    seconds: float
    compute: float
    traffic: float = 0.0
    traffic_bytes: float = 0.0
    link: Optional[Link] = None
    what: str = "exchange"   # what the traffic is: 'exchange', 'weight gather', 'activation hops'...
    per_gpu: bool = True     # traffic_bytes is what each GPU sends (False: the total, as for hops)

    def text(self):
        if not self.traffic_bytes:
            return f"about {self.seconds:.2f} s per step (compute only)"
        over = (f"over {self.link.description}" if self.link is not None else
                "(not counted: the inventory does not say how the GPUs are linked)")
        return (f"about {self.seconds:.2f} s per step: {self.compute:.2f} s of compute and "
                f"{gb(self.traffic_bytes)} of {self.what}{' per GPU' if self.per_gpu else ' in all'} {over}"
                + (f", {self.traffic:.2f} s" if self.link is not None else ""))


class StepCosts:
    """The estimates for one model, workload and inventory. speeds: {torch index: relative speed}."""

    def __init__(self, footprint, work, speeds, speed_source="given", pipelined=True):
        """pipelined: block distribution runs the step's items as micro-batches pipelined through the
        stages (the loader's pipeline_branches; else each stage takes the whole batch in turn)."""
        self.footprint, self.work, self.speeds, self.speed_source = footprint, work, speeds, speed_source
        self.pipelined = pipelined
        self.item_flops = flops_per_item(footprint, work.tokens)

    def _seconds(self, flops, gpus):
        slowest = min(self.speeds.get(g["index"], 1.0) for g in gpus)
        return flops / (ASSUMED_TFLOPS * 1e12 * slowest)

    def _over(self, nbytes, gpus):
        link = slowest_link(gpus)
        return link, (0.0 if link is None else nbytes / link.bytes_per_s)

    def single(self, gpu):
        compute = self._seconds(self.work.items * self.item_flops, [gpu])
        return Estimate(compute, compute)

    def data_parallel(self, chosen, items_per_gpu):
        compute = self._seconds(items_per_gpu * self.item_flops, chosen)
        return Estimate(compute, compute)

    def sequence_exchange_bytes(self, cfg_degree, ulysses, ring):
        """Bytes one GPU sends per step under Ulysses x ring with the items split over cfg_degree groups."""
        f, shards = self.footprint, ulysses * ring
        items = self.work.items // cfg_degree
        local = math.ceil(self.work.tokens / shards)
        per_block = 4 * local * f.dim * (ulysses - 1) / ulysses
        per_block += 2 * math.ceil(self.work.tokens / ring) * (f.dim / ulysses) * (ring - 1)
        return f.num_layers * items * per_block * EXCHANGE_BYTES

    def sequence_parallel(self, chosen, cfg_degree, ulysses, ring):
        compute = self._seconds(self.work.items // cfg_degree * self.item_flops / (ulysses * ring), chosen)
        nbytes = self.sequence_exchange_bytes(cfg_degree, ulysses, ring)
        link, traffic = self._over(nbytes, chosen)
        return Estimate(compute + traffic, compute, traffic, nbytes, link)

    def forwards_per_step(self, cfg_degree):
        """Forwards each GPU runs per step: two with CFG on and its branches not split over CFG groups
        (cond, then uncond: cfg_parallel.GuidedVelocityModel), else one."""
        return 2 if self.work.cfg and cfg_degree == 1 else 1

    def sharded(self, chosen, cfg_degree, ulysses, ring):
        """Sequence parallel with the weights sharded over all of `chosen`: gathered every forward."""
        world = len(chosen)
        split = self.sequence_parallel(chosen, cfg_degree, ulysses, ring)  # compute, and the exchange if any
        gathered = self.footprint.weight_bytes * (world - 1) / world * self.forwards_per_step(cfg_degree)
        link, gather = self._over(gathered, chosen)
        exchanged = ulysses * ring > 1
        return Estimate(max(split.compute, gather) + split.traffic, split.compute, gather + split.traffic,
                        gathered + split.traffic_bytes, link, "weight gather" + (" and exchange" if exchanged else ""))

    def block_distribution(self, chosen, blocks, swaps=None):
        """Stages in GPipe order: the first micro-batch through every stage, then one slowest stage per
        further micro-batch (items); without pipelining (self.pipelined False) the whole batch goes
        stage after stage."""
        block_flops = self.item_flops / self.footprint.num_layers
        per_item = [self._seconds(b * block_flops, [g]) for g, b in zip(chosen, blocks)]
        items = self.work.items
        compute = (sum(per_item) + (items - 1) * max(per_item) if self.pipelined and items > 1
                   else items * sum(per_item))
        swap_wait = 0.0
        for gpu, swapped, stage in zip(chosen, swaps or [0] * len(chosen), per_item):
            if swapped:
                rate, _ = pcie_gb_per_s(gpu.get("pcie_generation"), gpu.get("pcie_width"))
                swap_wait += max(0.0, swapped * self.footprint.block_bytes / (rate * 1e9) - items * stage)
        hop_bytes = (len(chosen) - 1) * items * self.work.tokens * self.footprint.dim * EXCHANGE_BYTES
        link, hops = self._over(hop_bytes, chosen)
        return Estimate(compute + swap_wait + hops, compute + swap_wait, hops, hop_bytes, link, "activation hops",
                        per_gpu=False)


SPEED_SOURCES = {"given": "as given in the inventory", "measured": "measured with a bf16 matmul probe",
                 "same model": "one GPU model",
                 "not measured": "not measured: not GPUs of this machine, or no CUDA here"}


def speeds_note(costs, gpus):
    """' Relative speeds (measured ...): GPU 0 1.00, GPU 1 0.50.' when the GPUs differ; else ''."""
    values = {g["index"]: costs.speeds.get(g["index"], 1.0) for g in gpus}
    if len(set(values.values())) < 2:
        return ""
    listed = ", ".join(f"GPU {i} {v:.2f}" for i, v in sorted(values.items()))
    return f" Relative speeds ({SPEED_SOURCES.get(costs.speed_source, costs.speed_source)}): {listed}."


def link_note(chosen):
    """' Link assumed: ...' naming the slowest link between the chosen GPUs and where it was read."""
    if len(chosen) < 2:
        return ""
    link = slowest_link(chosen)
    if link is None:
        return (" The inventory does not say how these GPUs are linked (no 'peers'), so the traffic was not "
                "weighed.")
    why = {"nvlink": "NVML reports NVLink between them",
           "pcie_p2p": "NVML or torch reports peer access between them",
           "pcie_host": "neither NVML nor torch reports NVLink or peer access between some of them, so every "
                        "exchange is staged through host memory"}[link.kind]
    return f" Link assumed: {link.description}, as {why}."
