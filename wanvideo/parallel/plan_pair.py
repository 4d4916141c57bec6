"""The plan for a Wan 2.2 A14B expert pair (a high-noise and a low-noise file) on an inventory of GPUs.

The placement is the expert loader's own 'auto' (experts.pair_placement: both experts on every GPU
as two worker groups when they fit every GPU's usable memory with the activations and the runtime
reserve and worker processes can run, else each expert on its half of the GPUs; one GPU: both
there, or the idle expert in host memory); each expert's strategy on its GPUs is the planner's
(plan.plan_parallelism). The result is a plan dict like plan_parallelism's (PLAN_KEYS) for the pair,
with 'experts': {'high_noise': plan, 'low_noise': plan} and 'low_noise_model' added.
"""
from ..pipeline import LoadSettings
from .experts import check_pair, expert_bytes, pair_bytes_per_gpu, pair_placement, reserve
from .plan import (ModelFootprint, Workload, check_inventory, gib, plan_parallelism, usable_memory,
                   worker_activation_bytes, worker_degrees, workers_refused)
from .plan_cost import link_note

__all__ = ["plan_expert_pair", "pair_name", "PAIR_KEYS"]

PAIR_KEYS = ("experts", "low_noise_model")


def pair_name(info):
    """'Wan 2.2 T2V A14B', 'Wan 2.2 I2V A14B (no CLIP)': the pair's model, whatever its files are called."""
    name = info.model_name.replace(" high-noise expert", "").replace(" low-noise expert", "")
    if info.family != "2.2":  # a file name that does not say 2.2: it is one, being half of a pair
        size = "A14B" if info.size_name == "14B" else info.size_name
        name = f"Wan 2.2 {info.model_type.upper()} {size}" + (" (no CLIP)" if info.model_type == "i2v" else "")
    return name


def plan_expert_pair(high_info, low_info, gpus, width=832, height=480, num_frames=81, base_precision="bf16",
                     quantization="disabled", cfg=True, batch_size=1, **settings):
    """(high-noise CheckpointInfo, low-noise CheckpointInfo, inventory) -> the pair's plan dict.

    Raises ValueError when the two files are not one model's two experts (experts.check_pair).
    settings: block_swap, torch_compile, shard_weights, pipeline_branches, as plan_parallelism takes them."""
    check_pair(high_info, low_info)
    check_inventory(gpus)
    workload = dict(width=width, height=height, num_frames=num_frames, base_precision=base_precision,
                    quantization=quantization, cfg=cfg, batch_size=batch_size, **settings)
    load = LoadSettings(base_precision=base_precision, quantization=quantization)
    need = expert_bytes(high_info, load)
    activations = reserve(high_info, load, dict(width=width, height=height, num_frames=num_frames))
    name = f"{pair_name(high_info)} high-noise + low-noise experts"
    if len(gpus) < 2:
        placement = "none"
        room = usable_memory(gpus[0]) if gpus else 0
        resident = bool(gpus) and pair_bytes_per_gpu(need, activations) <= room
        high = plan_parallelism(high_info, gpus, **workload)
        low = plan_parallelism(low_info, gpus, **workload)
        if resident:
            estimates = [e + need for e in high["estimated_memory_per_gpu"]]
            why = (f"both experts ({gib(2 * need)}) and the activations fit GPU {gpus[0]['index']} "
                   f"({gib(room)} usable): both stay resident, no upload at the switch")
        elif gpus:
            estimates = high["estimated_memory_per_gpu"]
            why = (f"both experts ({gib(2 * need)}) do not fit GPU {gpus[0]['index']} with the activations "
                   f"({gib(room)} usable): the idle expert rests in pinned host memory and is uploaded at the "
                   f"switch, so the GPU holds one expert at a time as planned here")
        else:
            estimates, why = [], "no CUDA GPU: both experts run on the CPU"
        gpu_ids = high["gpu_ids"]
    else:
        layout = _PairLayout(high_info, gpus, workload)
        # the loader's rule, with at least the activations the layout's own estimate counts (a batch)
        placement, why = pair_placement(gpus, need, max(activations, layout.activation),
                                        workers_refused(settings.get("block_swap"), settings.get("torch_compile")))
        if placement == "distributed":  # two worker groups on the same GPUs, each GPU holding both experts
            high = layout.plan(need)
            low = dict(high)
            gpu_ids, estimates = high["gpu_ids"], high["estimated_memory_per_gpu"]
            why += "." + link_note(gpus).rstrip(".")
        else:  # expert_parallel: the first half (an odd GPU to the high-noise expert) and the second half
            half = (len(gpus) + 1) // 2
            high = plan_parallelism(high_info, gpus[:half], **workload)
            low = plan_parallelism(low_info, gpus[half:], **workload)
            gpu_ids = [g["index"] for g in gpus]
            by_gpu = {**dict(zip(high["gpu_ids"], high["estimated_memory_per_gpu"])),
                      **dict(zip(low["gpu_ids"], low["estimated_memory_per_gpu"]))}
            estimates = [by_gpu.get(i, 0) for i in gpu_ids]
    plan = dict(high, parallelism_type=placement, gpu_ids=gpu_ids, estimated_memory_per_gpu=estimates,
                blocks_per_gpu=None, blocks_to_swap_per_gpu=None, shard_weights="off")
    if placement != "distributed":
        plan.update(ulysses_degree=1, ring_degree=1, cfg_degree=1)
    where = lambda p: f"GPU{'s' if len(p['gpu_ids']) > 1 else ''} {', '.join(map(str, p['gpu_ids'])) or 'none (CPU)'}"
    plan["experts"] = {"high_noise": high, "low_noise": low}
    plan["low_noise_model"] = low_info.path
    plan["reason"] = (f"{name}, placed {placement}: {why}. High-noise expert on {where(high)} "
                      f"({high['parallelism_type']}): {high['reason']} Low-noise expert on {where(low)} "
                      f"({low['parallelism_type']}): {_short(low['reason'], high['reason'])}")
    return plan


def _short(reason, same_as):
    """The low-noise expert's reason, or a pointer when it reads as the high-noise one's (same architecture)."""
    return "as the high-noise expert." if reason.replace("low-noise", "high-noise") == same_as else reason


class _PairLayout:
    """Each expert's worker group on all `gpus`, in the layout the workers choose themselves
    (plan.worker_degrees: CFG groups first, then Ulysses, then ring); every GPU holds both experts
    and one expert's share of the activations at a time."""

    def __init__(self, info, gpus, workload):
        self.gpus = gpus
        self.footprint = ModelFootprint(info, workload["base_precision"], workload["quantization"])
        self.work = Workload(self.footprint, workload["width"], workload["height"], workload["num_frames"],
                             workload["cfg"], workload["batch_size"])
        self.degrees = worker_degrees(len(gpus), self.footprint.num_heads, self.work)
        self.activation = worker_activation_bytes(self.footprint, self.work, self.degrees)

    def plan(self, need):
        footprint, work, degrees, world = self.footprint, self.work, self.degrees, len(self.gpus)
        per_gpu = pair_bytes_per_gpu(need, self.activation)
        return dict(parallelism_type="distributed", gpu_ids=[g["index"] for g in self.gpus], shard_weights="off",
                    base_precision=footprint.base_precision, quantization=footprint.quantization, blocks_to_swap=0,
                    blocks_to_swap_per_gpu=None, blocks_per_gpu=None, ulysses_degree=degrees.ulysses,
                    ring_degree=degrees.ring, cfg_degree=degrees.cfg, estimated_memory_per_gpu=[per_gpu] * world,
                    reason=f"{footprint.description} in {footprint.base_precision}: {world} worker processes "
                           f"(cfg_degree {degrees.cfg} x ulysses {degrees.ulysses} x ring {degrees.ring}) for "
                           f"{work.text}, each GPU holding both experts ({gib(2 * need)}) and one expert's "
                           f"activations ({gib(self.activation)}): {gib(per_gpu)} per GPU.")
