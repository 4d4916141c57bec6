"""Wan 2.2 A14B expert pairs: two checkpoints (high-noise, low-noise) loaded with the same settings and
strategy, placed on the GPUs, and run as one model by the sampling loop (wanvideo.sampling.experts).

    pair = load_expert_pair("wan2.2_t2v_high_noise_14B.safetensors", "wan2.2_t2v_low_noise_14B.safetensors",
                            "expert_parallel", gpu_ids="0,1")
    latents = pair.generate(noise, positive, negative, steps=40, cfg=4.0, cfg_low_noise=3.0, shift=12.0)

Placements (parallelism_type):
  none             one device. Both experts resident when they fit (with the activations); else the
                   idle one rests in host memory (expert_residency.HostMirror: pinned, mirrored
                   once) and is uploaded at the switch, which is timed and logged.
  expert_parallel  the high-noise expert on the first half of the devices, the low-noise one on the
                   second half, each half with the inner strategy (one device each: 'none'; more:
                   'auto', or data_parallel / block_distribution / distributed); the latents and the
                   solver's history hop to the active expert's device at the switch.
  data_parallel, block_distribution
                   each expert placed by that strategy over all the devices (both resident, or with
                   idle_expert='cpu' the idle one stepped aside).
  distributed      two worker groups on the same GPUs, one per expert, driven step by step from this
                   process's loop (each step one 'forward' request of guided-free velocities), so every
                   rank switches at the same step.
  auto             one device: 'none'; several GPUs: 'distributed' when both experts fit every GPU
                   (pair_placement: with the activations and the runtime reserve, in the planner's
                   usable memory) and worker processes can run (no block swap, no torch.compile,
                   NCCL there), else 'expert_parallel'.
Every sub-pipeline is loaded through the one entry point, load_parallel_pipeline.
"""
import logging
import time
from dataclasses import replace

import torch

from ..checkpoint import inspect_checkpoint, resolve_dtype
from ..devices import free_and_total_bytes, free_bytes, release_memory
from ..gpus import discovery
from ..pipeline import LoadSettings
from ..sampling import Conditioning, sample_video
from ..sampling.experts import EXPERTS, HIGH_NOISE, LOW_NOISE, ExpertPair, check_boundary, official_boundary
from .devices import resolve_devices
from .expert_residency import residency_for, timed_switch
from .load import load_parallel_pipeline
from .plan import RUNTIME_RESERVE_BYTES, activation_reserve_bytes, gib, usable_memory, workers_refused

logger = logging.getLogger(__name__)

__all__ = ["load_expert_pair", "ExpertPairPipeline", "PAIR_PARALLELISM_TYPES", "IDLE_EXPERT_CHOICES"]

PAIR_PARALLELISM_TYPES = ("auto", "none", "expert_parallel", "data_parallel", "block_distribution", "distributed")
IDLE_EXPERT_CHOICES = ("auto", "resident", "cpu")  # auto: resident when both fit the device, else cpu
_SAME_ARCHITECTURE = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "patch_size")


class _Expert:
    """One expert as the loop sees it: its pipeline's denoiser, computing on the pipeline's device
    (where the latents go when it is active)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, *args, **kwargs):
        return self.pipeline.denoiser(*args, **kwargs)

    @property
    def device(self):
        return self.pipeline.device

    def __getattr__(self, name):  # patch_size, prefers_batched_cfg, text_dim: the denoiser's
        if name in ("patch_size", "prefers_batched_cfg", "text_dim"):
            return getattr(self.pipeline.denoiser, name)
        raise AttributeError(name)


class WorkerGroupExpert:
    """A distributed expert (its own worker group) as a denoiser of the parent's loop: each call is
    one 'forward' request with every branch in one batch at cfg 1, so the loop guides and switches."""

    prefers_batched_cfg = True  # cond and uncond travel in one request
    device = torch.device("cpu")  # the workers return velocities to this process's memory

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.patch_size = tuple(pipeline.runner.served.patch_size)

    def __call__(self, x, t, context, seq_len=None, clip_fea=None, y=None):
        branch = Conditioning(list(context), clip_fea, None if y is None else torch.stack(list(y)))
        return list(self.pipeline.runner.forward(torch.stack(list(x)), t, branch, None, cfg=1.0))


class _PlacedPair(ExpertPair):
    """ExpertPair whose before_step brings the step's expert onto its devices (idle_expert='cpu')."""

    def __init__(self, owner, boundary):
        super().__init__(owner.experts[HIGH_NOISE], owner.experts[LOW_NOISE], boundary)
        self.owner, self.switches = owner, []  # switches: (step, expert entering, seconds)

    def before_step(self, step_index, sigmas):
        name = HIGH_NOISE if self.uses_high_noise(sigmas[step_index]) else LOW_NOISE
        seconds = self.owner.make_resident(name)
        if seconds is not None:
            self.switches.append((step_index, name, seconds))
        return self.experts[name]


class ExpertPairPipeline:
    """Two WanPipelines (high-noise, low-noise) run as one model; what the loader node returns for a pair.

    generate(noise, positive, negative, cfg_low_noise=None, boundary=None, **sampler_args) takes
    sample_video's arguments; `cfg` guides the high-noise expert, `cfg_low_noise` (default cfg) the
    low-noise one; boundary None: the pair's (the official value unless given at load).
    """

    def __init__(self, high, low, boundary, placement, idle_in_host=False, rest_between_runs=False):
        self.pipelines = {HIGH_NOISE: high, LOW_NOISE: low}
        self.experts = {name: WorkerGroupExpert(p) if getattr(p, "runner", None) is not None else _Expert(p)
                        for name, p in self.pipelines.items()}
        self.boundary, self.placement = check_boundary(boundary), placement
        self.info, self.settings, self.device = high.info, high.settings, high.device
        self.idle_in_host, self.rest_between_runs = idle_in_host, rest_between_runs
        self.residency = {}  # name -> HostMirror / StepAside, for placements that move experts
        self.before_run, self.last_switches, self._aside, self._cleanups = None, [], False, []

    @property
    def denoiser(self):  # None once unloaded, as WanPipeline's
        return None if any(p.denoiser is None and getattr(p, "runner", None) is None
                           for p in self.pipelines.values()) else self

    @property
    def is_aside(self):
        return self._aside

    def add_cleanup(self, fn):
        self._cleanups.append(fn)

    # --- residency ------------------------------------------------------------------------------

    def make_resident(self, name):
        """Bring expert `name` onto its devices, the other one off them when they share memory.
        -> seconds the switch took, or None when nothing moved."""
        entering = self.residency.get(name)
        if entering is None or entering.resident:
            return None
        other = self.residency.get(LOW_NOISE if name == HIGH_NOISE else HIGH_NOISE)
        seconds = timed_switch(other if self.idle_in_host and other is not None and other.resident else None, entering)
        logger.info("Expert switch: %s expert in place in %.2f s.", name.replace("_", "-"), seconds)
        return seconds

    def step_aside(self):
        """Lend every device's memory to the host application (ComfyUI); come_back() or the next run undoes it."""
        for name, pipeline in self.pipelines.items():
            residency = self.residency.get(name)
            if residency is not None:
                residency.leave()
            elif hasattr(pipeline, "step_aside"):
                pipeline.step_aside()
        self._aside = True
        release_memory()

    def come_back(self):
        """The experts a run starts with, back on their devices: both, or the high-noise one when the idle
        expert rests in host memory."""
        for name, pipeline in self.pipelines.items():
            residency = self.residency.get(name)
            if residency is None:
                if hasattr(pipeline, "come_back"):
                    pipeline.come_back()
            elif name == HIGH_NOISE or not self.idle_in_host:
                self.make_resident(name)
        self._aside = False

    def memory_by_device(self):
        """{device: bytes} while resident: the sum of both experts, or with the idle expert in host
        memory the larger of the two (one at a time)."""
        usage = {}
        for pipeline in self.pipelines.values():
            held = pipeline.memory_by_device() if hasattr(pipeline, "memory_by_device") else {}
            for device, nbytes in held.items():
                usage[device] = max(usage.get(device, 0), nbytes) if self.idle_in_host else usage.get(device, 0) + nbytes
        return usage

    # --- running --------------------------------------------------------------------------------

    def expert_pair(self, boundary=None):
        """The ExpertPair sample_video runs (its before_step moves experts; `switches` records the
        moves: (step, expert, seconds)), with the run-start experts back in place. boundary None: the pair's."""
        self.come_back()
        return _PlacedPair(self, self.boundary if boundary is None else boundary)

    def generate(self, noise, positive, negative=None, cfg_low_noise=None, boundary=None, **sampler_args):
        """Sample latents (model space) with both experts -> [B, 16, F, H, W] float32 on noise.device."""
        if self.denoiser is None:
            raise RuntimeError("This model was unloaded; run the loader node again.")
        if self.before_run is not None:
            self.before_run(self, noise, sampler_args)
        pair = self.expert_pair(boundary)
        began = time.perf_counter()
        try:
            return sample_video(pair, noise, positive, negative, cfg_low_noise=cfg_low_noise, **sampler_args)
        finally:
            self.last_switches = pair.switches
            if self.rest_between_runs:  # load_device 'offload_device': the weights rest in host memory
                self.step_aside()
            if pair.switches:
                logger.info("Run of %.1f s with %d expert switch(es): %s.", time.perf_counter() - began,
                            len(pair.switches), ", ".join(f"step {s}: {n} {t:.2f} s" for s, n, t in pair.switches))

    def unload(self):
        """Return every device's memory (both experts, their workers and host mirrors)."""
        while self._cleanups:
            self._cleanups.pop()()
        for residency in self.residency.values():
            residency.release()
        self.residency = {}
        for pipeline in self.pipelines.values():
            pipeline.unload()
        release_memory()

    def describe(self):
        name = getattr(self.info, "model_name", None) or f"Wan {self.info.model_type} {self.info.size_name}"
        name = name.replace(" high-noise expert", "").replace(" low-noise expert", "")
        lines = [f"{name} high-noise + low-noise experts, boundary {self.boundary:g} "
                 f"(t >= {self.boundary * 1000:g}: high-noise)", self.placement]
        for expert, pipeline in self.pipelines.items():
            lines.append(f"{expert.replace('_', '-')}: " + pipeline.describe().replace("\n", "; "))
        return "\n".join(lines)


# --- loading ------------------------------------------------------------------------------------

def check_pair(high_info, low_info):
    """The two files must be one model's two experts: same architecture, in the right order."""
    differences = [f"{k} {high_info.config.get(k)} vs {low_info.config.get(k)}" for k in _SAME_ARCHITECTURE
                   if tuple(_listify(high_info.config.get(k))) != tuple(_listify(low_info.config.get(k)))]
    if differences:
        raise ValueError(f"{high_info.path!r} and {low_info.path!r} are not two experts of one model: "
                         f"{', '.join(differences)}. Choose the high-noise and low-noise files of the same Wan 2.2 "
                         "A14B model (t2v or i2v).")
    named = (getattr(high_info, "expert", None), getattr(low_info, "expert", None))
    if named[0] == LOW_NOISE or named[1] == HIGH_NOISE:
        raise ValueError(f"The files look swapped: {high_info.path!r} is named as a {named[0] or 'high_noise'} expert "
                         f"and {low_info.path!r} as a {named[1] or 'low_noise'} one. Give the high-noise expert as "
                         "the main model and the low-noise expert as the second file.")


def _listify(value):
    return value if isinstance(value, (list, tuple)) else [value]


def expert_bytes(info, settings):
    """Bytes of one expert's weights at these settings (precision, quantization)."""
    block_bytes, other_bytes = info.bytes_at(resolve_dtype(settings.base_precision), settings.quantization)
    return block_bytes * info.num_layers + other_bytes


def reserve(info, settings, plan_inputs):
    """Bytes of activations to keep free beside the experts (the planner's estimate for a CFG step of
    plan_inputs' width, height and num_frames; 0 when it cannot be made)."""
    try:
        return activation_reserve_bytes(info, settings.base_precision, settings.quantization,
                                        plan_inputs.get("width", 832), plan_inputs.get("height", 480),
                                        plan_inputs.get("num_frames", 81))
    except Exception as error:  # advisory
        logger.debug("No activation estimate: %s", error)
        return 0


def _plan_pair(devices, info, settings, plan_inputs):
    """'auto' for a pair -> (parallelism_type, reason): pair_placement, as the planner's plan_pair."""
    gpus = [d for d in devices if d.type == "cuda"]
    if len(gpus) < 2:
        return "none", f"one device ({devices[0]}): both experts there, or the idle one in host memory"
    inventory = []
    for d in gpus:
        free, total = free_and_total_bytes(d)
        inventory.append(dict(index=d.index, free_memory=free, total_memory=total))
    return pair_placement(inventory, expert_bytes(info, settings), reserve(info, settings, plan_inputs),
                          workers_refused(settings.swaps_blocks, settings.compile_args is not None))


def pair_bytes_per_gpu(need, reserve_bytes):
    """A GPU holding both experts (need bytes each), the activations and the runtime reserve."""
    return 2 * need + reserve_bytes + RUNTIME_RESERVE_BYTES


def pair_placement(gpus, need, reserve_bytes, refused=""):
    """'auto' for a pair on two or more GPUs -> (parallelism_type, reason); the loader's and the
    planner's (plan_pair.py) one rule.

    gpus: inventory dicts (index, free_memory, total_memory); need: one expert's bytes;
    reserve_bytes: the activations to keep free; refused: why the distributed strategy's worker
    processes cannot run here ('' when they can: plan.workers_refused). 'distributed' (two worker
    groups, both experts on every GPU) when 2 x need + reserve_bytes + RUNTIME_RESERVE_BYTES fits
    every GPU's usable_memory (the planner's test, so a plan saying so passes validate_model_setup)
    and worker processes can run; else 'expert_parallel' (each expert on its half of the GPUs)."""
    per_gpu = pair_bytes_per_gpu(need, reserve_bytes)
    tightest = min(gpus, key=usable_memory)
    room = usable_memory(tightest)
    if per_gpu > room:
        return "expert_parallel", (f"both experts ({gib(2 * need)}) with the activations and the runtime reserve "
                                   f"({gib(per_gpu)} in all) do not fit GPU {tightest['index']} ({gib(room)} "
                                   "usable): each expert on its half of the GPUs")
    if refused:
        return "expert_parallel", (f"both experts ({gib(2 * need)}) fit every GPU, but the two worker groups of "
                                   f"'distributed' cannot run: {refused}; so each expert on its half of the GPUs")
    return "distributed", (f"both experts ({gib(2 * need)}) with the activations and the runtime reserve "
                           f"({gib(per_gpu)} in all) fit every GPU: two worker groups share the {len(gpus)} GPUs, "
                           "each step split over all of them")


def _load(path, parallelism_type, devices, settings, plan_inputs):
    return load_parallel_pipeline(path, parallelism_type, settings=settings, devices=devices, **plan_inputs)


def load_expert_pair(high_path, low_path, parallelism_type="none", gpu_ids=None, settings=None, devices=None,
                     boundary=None, idle_expert="auto", inner_parallelism="auto", loras_by_expert=None, **plan_inputs):
    """Load a Wan 2.2 A14B high-noise / low-noise pair with one strategy -> ExpertPairPipeline.

    parallelism_type: one of PAIR_PARALLELISM_TYPES (see the module docstring). gpu_ids / devices:
      as load_parallel_pipeline (devices: explicit, CPU devices allowed, for tests).
    boundary: in (0, 1); None: the official one from the headers (0.875 t2v, 0.900 i2v).
    idle_expert: 'resident' (both on their devices), 'cpu' (the idle expert in host memory,
      uploaded at the switch), 'auto' (on one device: resident when both fit with the activations;
      elsewhere: resident). expert_parallel and distributed keep both resident.
    inner_parallelism: expert_parallel's strategy on each half ('auto': 'none' for one device each,
      the planner's choice for more).
    loras_by_expert: {'high_noise': [(path, strength)], 'low_noise': [...]}: each expert's LoRAs
      (default: settings.loras for both).
    plan_inputs: width, height, num_frames, pipeline_branches, enable_block_distribution, ... as
      load_parallel_pipeline.
    """
    settings = settings or LoadSettings()
    if parallelism_type not in PAIR_PARALLELISM_TYPES:
        raise ValueError(f"parallelism_type {parallelism_type!r} is not one of "
                         f"{', '.join(map(repr, PAIR_PARALLELISM_TYPES))} for an expert pair.")
    if idle_expert not in IDLE_EXPERT_CHOICES:
        raise ValueError(f"idle_expert {idle_expert!r} is not one of {', '.join(map(repr, IDLE_EXPERT_CHOICES))}.")
    high_info, low_info = inspect_checkpoint(high_path), inspect_checkpoint(low_path)
    check_pair(high_info, low_info)
    boundary = official_boundary(high_info.config["in_dim"], high_info.config["out_dim"]) if boundary is None \
        else check_boundary(boundary)
    if devices is None and not discovery.get_available_gpus():
        devices = [torch.device("cpu")]
    devices = resolve_devices(gpu_ids, devices)
    if parallelism_type == "auto":
        parallelism_type, reason = _plan_pair(devices, high_info, settings, plan_inputs)
        logger.info("auto for the expert pair: %s (%s).", parallelism_type, reason)
    rest_between_runs = settings.load_device == "offload_device"
    settings = replace(settings, load_device="main_device")  # the pair moves its weights itself
    per_expert = {name: replace(settings, loras=list((loras_by_expert or {}).get(name, settings.loras)))
                  for name in EXPERTS}
    paths = {HIGH_NOISE: high_path, LOW_NOISE: low_path}

    if parallelism_type == "expert_parallel":
        if len(devices) < 2:
            raise ValueError(f"expert_parallel puts each expert on its own devices and needs at least 2; got "
                             f"{[str(d) for d in devices]}. Use 'none' for one GPU.")
        half = (len(devices) + 1) // 2  # an odd device goes to the high-noise expert
        placed = {HIGH_NOISE: devices[:half], LOW_NOISE: devices[half:]}
        inner = {name: ("none" if len(d) == 1 else inner_parallelism) for name, d in placed.items()}
        placement = ("expert_parallel: high-noise expert on " + ", ".join(map(str, placed[HIGH_NOISE]))
                     + f" ({inner[HIGH_NOISE]}), low-noise expert on " + ", ".join(map(str, placed[LOW_NOISE]))
                     + f" ({inner[LOW_NOISE]}); the latents hop at the switch")
        idle_in_host = False
    else:
        if parallelism_type == "none" or (len(devices) == 1 and parallelism_type != "distributed"):
            parallelism_type, devices = "none", devices[:1]
        placed = {name: devices for name in EXPERTS}
        inner = {name: parallelism_type for name in EXPERTS}
        idle_in_host = idle_expert == "cpu" or rest_between_runs
        if idle_expert == "auto" and parallelism_type == "none" and not rest_between_runs:
            free, activations = free_bytes(devices[0]), reserve(high_info, settings, plan_inputs)
            need = expert_bytes(high_info, settings) + expert_bytes(low_info, settings)
            idle_in_host = free is not None and need + activations > free
            if idle_in_host:
                logger.info("Both experts (%.1f GiB) and the activations (%.1f GiB) do not fit %s (%.1f GiB free): "
                            "the idle expert rests in host memory.", need / 2**30, activations / 2**30, devices[0],
                            free / 2**30)
        if idle_in_host and parallelism_type == "distributed":
            raise NotImplementedError("The distributed pair keeps both experts in its worker groups; with too "
                                      "little GPU memory use expert_parallel, or shard_weights='on'.")
        where = ", ".join(map(str, devices))
        placement = (f"{parallelism_type} for each expert on {where}: " +
                     ("the idle expert rests in host memory and is uploaded at the switch" if idle_in_host
                      else "both experts resident"))
        if parallelism_type == "distributed":
            placement = f"distributed: two worker groups on {where}, one per expert, switching at the same step"

    # Load order: with the idle expert in host memory the low-noise one goes first and steps aside,
    # so the high-noise expert (the first steps') loads into the freed memory and stays.
    order = (LOW_NOISE, HIGH_NOISE) if idle_in_host else (HIGH_NOISE, LOW_NOISE)
    pipelines, residency = {}, {}
    try:
        for name in order:
            pipelines[name] = _load(paths[name], inner[name], placed[name], per_expert[name], plan_inputs)
            if idle_in_host:
                residency[name] = residency_for(pipelines[name])
                if name == LOW_NOISE:
                    residency[name].leave()
                    release_memory()
    except BaseException:
        for item in residency.values():
            item.release()
        for pipeline in pipelines.values():
            pipeline.unload()
        release_memory()
        raise
    pair = ExpertPairPipeline(pipelines[HIGH_NOISE], pipelines[LOW_NOISE], boundary, placement, idle_in_host,
                              rest_between_runs)
    pair.residency = residency
    if rest_between_runs:
        pair.placement += "; the weights rest in host memory between runs"
        pair.step_aside()
    logger.info("Loaded expert pair:\n%s", pair.describe())
    return pair
