"""A PROJECTION (not a measurement) of the distributed strategy's step time on 2, 4 and 8 GPUs, from one GPU.

For each case (Wan 2.1 14B 720p and 1.3B 480p, 81 frames, cfg 5 with its two branches and cfg 1),
each GPU count N (2, 4, 8; the layout `choose_degrees` picks: CFG parallel, then Ulysses, then ring)
and weight sharding off / on:

  projected step = rank 0's compute (timed on this one GPU) + sum over the collectives of one step
                   of (bytes over the link per rank) / (the link's effective one-direction bandwidth)

1. Rank 0's share of the work runs through the real code, on this GPU: `ParallelGroups` for rank 0
   of N, `apply_sequence_parallel` (its token shard, the Ulysses packing and head split, the ring
   loop, the head-output gather) and `GuidedVelocityModel` (its CFG branch, the CFG gather), plus
   the per-step interrupt all-reduce of the worker session. Every torch.distributed collective on the
   groups of that layout is replaced by a local stand-in of the same shapes (`StandInCollectives`:
   the receive buffer is filled from the send buffer), which also logs the bytes each call sends.
   Why stand-ins rather than a world of one with the shard's sizes: a world of one runs none of the
   sequence-parallel code (no shard, no all-to-all packing, no head padding, no ring merge), so its
   timing would be of a different program; the stand-ins keep every kernel of rank r of N, and the
   bytes they log are what rank r sends (tests/test_benchmark.py proves it against a counted run of
   real gloo ranks). The stand-ins' copies stay in the timed compute (a small overcount: the real
   collective's local reads and writes are about the same size). Rank 0 stands for all: the
   shards are equal (the last one padded) and every rank runs the same kernels.
2. With weight sharding, the model is `fully_shard`ed by the package's own `sharding.shard` over a
   real process group of one (NCCL on a GPU, gloo on the CPU), so FSDP2's hooks, its all-gather
   copy-in / copy-out and prefetch stream run as on rank r; the bytes rank r then sends per forward
   (every block's and the root's padded row shard, once per forward) are computed from the
   parameter shapes (`fsdp_gather_bytes`), which the test also checks against real gloo ranks.
3. Only a few blocks are built and timed (real dims, random bf16 weights initialised on the GPU):
   the step is timed with `blocks` (a, b) and extrapolated linearly to the model's layer count, and
   so are the bytes per collective (embedding, head and once-per-forward gathers are the intercept).
   Each point: one counted step (also the warm-up: it compiles the fused kernels for the shard's
   shape), then `iters` steps timed with CUDA events after a synchronize, the median kept. A
   configuration that fails (out of memory, no NCCL for the group of one) becomes a row with its
   error; the others still run, and the JSON is written after every case.
4. Link time per collective and rank (group size g, s = bytes of the send buffer as logged):
   all-to-all (g-1)/g * s, all-gather (g-1) * s (what each rank receives), ring send / receive s,
   all-reduce 2 (g-1)/g * s. The link is assumed non-blocking (each GPU's own link is the limit)
   and every transfer on the critical path: `step_s` adds them all (an upper bound). FSDP's weight
   gathers (prefetched on their own stream) and the ring's K/V sends (issued before the current
   chunk is attended) can hide behind compute: `step_overlap_s` hides them completely (a lower
   bound), so for those layouts the truth should lie between the two. Ulysses' all-to-alls, the
   head's gather and the CFG exchange wait for their data and are never hidden. Latency per call is
   not modelled. PCIe without peer-to-peer access (many consumer boards) goes through host memory:
   pass a lower --link figure for it.

The one-GPU baseline is the same timed path with N = 1 (plain model, both branches at cfg 5).
"""
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python benchmarks/X.py`
from wanvideo.gpus.links import PCIE_LANE_GB_PER_S, nvlink_gb_per_s  # noqa: E402
from wanvideo.modules.model import WanModel  # noqa: E402
from wanvideo.parallel.distributed.cfg_parallel import GuidedVelocityModel  # noqa: E402
from wanvideo.parallel.distributed.sequence_parallel import apply_sequence_parallel  # noqa: E402
from wanvideo.parallel.distributed.topology import ParallelDegrees, ParallelGroups, choose_degrees  # noqa: E402
from wanvideo.parallel.distributed.workers import free_port  # noqa: E402
from wanvideo.sampling import Conditioning  # noqa: E402

LABEL = "projection (not measured)"
GB = 1e9

# Effective one-direction bandwidth per GPU. The datasheet figures are the package's one link table,
# wanvideo/gpus/links.py (its sources there): NVLink 4 (compute capability 9.0, H100 / H200 SXM)
# 450 GB/s each way; PCIe 5.0 / 4.0 x16 63 / 31.5 GB/s each way raw (32 / 16 GT/s x 16 lanes,
# 128b/130b). "Effective" is the projection's own assumption, PROJECTION_EFFICIENCY of those
# (protocol overhead and what NCCL reaches on large messages; the planner's links.py takes PCIe at
# its own 0.8 and NVLink at the datasheet figure); measure your own with nccl-tests and pass it with
# --link "NAME=GB/s" (bench_multi_gpu.py --project --link "NVLink 4=380").
PROJECTION_EFFICIENCY = 0.8


def _link_spec(datasheet_gb_per_s):
    return dict(datasheet_GBps=round(datasheet_gb_per_s, 1),
                effective_GBps=round(datasheet_gb_per_s * PROJECTION_EFFICIENCY, 1))


LINKS = {"NVLink 4": _link_spec(nvlink_gb_per_s((9, 0))),
         "PCIe 5.0 x16": _link_spec(PCIE_LANE_GB_PER_S[5] * 16),
         "PCIe 4.0 x16": _link_spec(PCIE_LANE_GB_PER_S[4] * 16)}

SIZES = {"1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
         "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
         "tiny": dict(dim=96, ffn_dim=192, num_heads=6, num_layers=4, freq_dim=32, text_dim=32)}
# case: (size, (width, height), frames, cfg) -- the names of bench_multi_gpu.py's cases
CASES = {"14B_720p": ("14B", (1280, 720), 81, 5.0), "14B_720p_cfg1": ("14B", (1280, 720), 81, 1.0),
         "14B_480p_cfg1": ("14B", (832, 480), 81, 1.0),
         "1.3B_480p": ("1.3B", (832, 480), 81, 5.0), "1.3B_480p_cfg1": ("1.3B", (832, 480), 81, 1.0)}
DRY_CASES = {"tiny_cfg5": ("tiny", (64, 48), 9, 5.0), "tiny_cfg1": ("tiny", (64, 48), 9, 1.0)}
GPU_COUNTS = (2, 4, 8)
FSDP_GATHER = "fsdp_all_gather"  # the weight gathers of sharding, one name whichever torch call made them
# Transfers the code issues ahead of the compute that needs them: FSDP's prefetch of the next block,
# the ring's send of the next K/V chunk while this one is attended. step_overlap_s hides them.
OVERLAPPED = (FSDP_GATHER, "batch_isend_irecv")


# --- stand-in collectives ------------------------------------------------------------------------

class StandInGroup:
    """What dist.new_group returns under StandInCollectives: the ranks of a group of the layout."""

    def __init__(self, ranks):
        self.ranks = list(ranks)

    def size(self):
        return len(self.ranks)

    def __repr__(self):
        return f"StandInGroup({self.ranks})"


class _StandInP2POp:
    def __init__(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):
        self.op, self.tensor, self.peer, self.group = op, tensor, peer, group


def link_bytes(name, sent, group_size):
    """Bytes one rank moves over its link for one call sending `sent` bytes in a group of `group_size`."""
    g = group_size
    if name == "all_to_all_single":
        return sent * (g - 1) / g
    if name in ("all_gather", FSDP_GATHER):
        return sent * (g - 1)
    if name == "all_reduce":
        return 2 * sent * (g - 1) / g
    if name == "batch_isend_irecv":
        return sent
    raise ValueError(f"no link model for {name}")


@contextlib.contextmanager
def stand_in_groups():
    """Inside: dist.new_group makes StandInGroups (only while ParallelGroups is built, so FSDP's own
    device mesh gets real groups)."""
    saved = dist.new_group
    dist.new_group = lambda ranks=None, *args, **kwargs: StandInGroup(ranks)
    try:
        yield
    finally:
        dist.new_group = saved


class StandInCollectives:
    """Inside `with`: the collectives the sequence-parallel
    and CFG code call on them become local copies of the same shapes; each call is logged as
    (name, bytes of the send buffer, group size) in `log` while `counting` is true. Calls on real
    process groups (FSDP's on the world of one) go to torch.distributed unchanged."""

    PATCHED = ("all_to_all_single", "all_gather", "all_reduce", "batch_isend_irecv", "P2POp")

    def __init__(self):
        self.log, self.counting, self._saved = [], True, {}

    def _record(self, name, tensor, group):
        if self.counting:
            self.log.append((name, tensor.numel() * tensor.element_size(), group.size()))

    def __enter__(self):
        self._saved = {name: getattr(dist, name) for name in self.PATCHED}
        saved = self._saved

        def all_to_all_single(output, input, *args, group=None, **kwargs):
            if not isinstance(group, StandInGroup):
                return saved["all_to_all_single"](output, input, *args, group=group, **kwargs)
            self._record("all_to_all_single", input, group)
            output.copy_(input)

        def all_gather(tensor_list, tensor, group=None, async_op=False):
            if not isinstance(group, StandInGroup):
                return saved["all_gather"](tensor_list, tensor, group=group, async_op=async_op)
            self._record("all_gather", tensor, group)
            for part in tensor_list:
                part.copy_(tensor)

        def all_reduce(tensor, op=None, group=None, async_op=False):
            if not isinstance(group, StandInGroup):
                return saved["all_reduce"](tensor, *(() if op is None else (op,)), group=group, async_op=async_op)
            self._record("all_reduce", tensor, group)

        def batch_isend_irecv(ops):
            if not all(isinstance(op, _StandInP2POp) for op in ops):
                return saved["batch_isend_irecv"](ops)
            sends = [op for op in ops if op.op is saved_isend]
            receives = [op for op in ops if op.op is not saved_isend]
            for send, receive in zip(sends, receives):
                self._record("batch_isend_irecv", send.tensor, send.group)
                receive.tensor.copy_(send.tensor)
            return []

        def p2p_op(op, tensor, peer=None, group=None, tag=0, group_peer=None):
            if isinstance(group, StandInGroup):
                return _StandInP2POp(op, tensor, peer, group, tag, group_peer)
            return saved["P2POp"](op, tensor, peer, group, tag, group_peer)

        saved_isend = dist.isend
        replacements = dict(all_to_all_single=all_to_all_single, all_gather=all_gather, all_reduce=all_reduce,
                            batch_isend_irecv=batch_isend_irecv, P2POp=p2p_op)
        for name, fn in replacements.items():
            setattr(dist, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return False


def summarize(log):
    """[(name, bytes, group size)] -> {name: {calls, bytes, link_bytes}}."""
    out = {}
    for name, sent, group_size in log:
        entry = out.setdefault(name, dict(calls=0, bytes=0, link_bytes=0.0))
        entry["calls"] += 1
        entry["bytes"] += sent
        entry["link_bytes"] += link_bytes(name, sent, group_size)
    return out


def fsdp_gather_bytes(config, world_size, dtype=torch.bfloat16):
    """Bytes one rank sends per forward in sharding's weight all-gathers: FSDP2 pads every
    parameter's dim 0 to a multiple of the world size, and each unit (every block, then the root:
    embeddings and head) is gathered once per forward (reshard_after_forward=True)."""
    with torch.device("meta"):
        model = WanModel(**config)
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for param in model.parameters():
        rows = param.shape[0] if param.dim() else 1
        total += -(-rows // world_size) * (param.numel() // max(rows, 1)) * element
    return total


# --- the timed rank share ------------------------------------------------------------------------

@contextlib.contextmanager
def world_of_one(device):
    """A real process group of one rank in this process (FSDP2 needs one), unless one exists ->
    None, or why there is none (the sharded rows then carry that error; the others still run)."""
    if dist.is_initialized():
        yield None
        return
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    except Exception as error:  # noqa: BLE001 - reported in the rows that need it
        yield f"no process group of one for weight sharding: {error!r}"
        return
    try:
        yield None
    finally:
        dist.destroy_process_group()


def build_blocks_model(config, layers, device, dtype, seed=0):
    """A WanModel of `config` with `layers` blocks: random weights drawn on `device` (never zero)."""
    with torch.device("meta"):
        model = WanModel(**dict(config, num_layers=layers))
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def seconds(fn, device, iters, warmup):
    """Median seconds of fn(): CUDA events after a synchronize on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


@dataclass
class Workload:
    config: dict          # the model (num_layers: the full count)
    latent: tuple         # (C, F, H, W) of one video
    text_tokens: int      # of each prompt
    cfg: float
    device: torch.device
    dtype: torch.dtype


def _inputs(work):
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(work.latent, generator=g).to(work.device)]
    text = lambda: [torch.randn(work.text_tokens, work.config.get("text_dim", 4096), generator=g).to(work.device)]
    positive, negative = text(), Conditioning(text())
    return x, torch.tensor([700.0], device=work.device), positive, negative


def rank_step(work, degrees, layers, shard, stand_ins, rank=0, iters=1):
    """Rank `rank` of the layout `degrees` runs one step (its branch or both, then the interrupt
    all-reduce) with a model of `layers` blocks -> (median seconds of `iters` timed steps, or None
    for iters 0; summarize(log) of one step). The counted step comes first and is the warm-up
    (it compiles the fused kernels for this shape)."""
    world = degrees.world_size
    model = build_blocks_model(work.config, layers, work.device, work.dtype)
    if shard:
        from wanvideo.parallel.distributed.sharding import shard as shard_model
        shard_model(model, work.device, prefetch=True)
    with stand_in_groups():
        groups = ParallelGroups(degrees, rank, world)
    apply_sequence_parallel(model, groups)
    guided = GuidedVelocityModel(model, groups, _inputs(work)[3], work.cfg)
    x, t, positive, _ = _inputs(work)
    flag = torch.zeros(1, dtype=torch.int32, device=work.device)

    def step():
        out = guided(x, t, positive)
        if world > 1:  # WorkerSession.any_rank before every step: one all-reduce on the world
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=StandInGroup(range(world)))
        return out

    with torch.no_grad():
        stand_ins.log.clear()
        stand_ins.counting = True
        step()
        counted = summarize(stand_ins.log)
        stand_ins.counting = False
        elapsed = seconds(step, work.device, iters, warmup=0) if iters else None
    del model, guided
    if work.device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed, counted


def extrapolate(a, b, layers_a, layers_b, layers):
    """The value at `layers` on the line through (layers_a, a) and (layers_b, b)."""
    return a + (b - a) * (layers - layers_a) / (layers_b - layers_a)


def measure_rank(work, degrees, shard, blocks, iters, stand_ins):
    """Rank 0's step at the full layer count -> dict(compute_s, collectives per step)."""
    (time_a, count_a), (time_b, count_b) = (rank_step(work, degrees, n, shard, stand_ins, iters=iters)
                                            for n in blocks)
    layers = work.config["num_layers"]
    collectives = {}
    for name in set(count_a) | set(count_b):
        a, b = count_a.get(name, dict(calls=0, bytes=0, link_bytes=0.0)), count_b.get(name, dict(calls=0, bytes=0,
                                                                                                  link_bytes=0.0))
        collectives[name] = {k: extrapolate(a[k], b[k], *blocks, layers) for k in a}
        collectives[name]["calls"] = round(collectives[name]["calls"])
        collectives[name]["bytes"] = round(collectives[name]["bytes"])
    if shard and degrees.world_size > 1:
        forwards = 2 if work.cfg != 1 and degrees.cfg == 1 else 1
        sent = forwards * fsdp_gather_bytes(work.config, degrees.world_size, work.dtype)
        collectives[FSDP_GATHER] = dict(calls=forwards * (layers + 1), bytes=sent,
                                        link_bytes=link_bytes(FSDP_GATHER, sent, degrees.world_size))
    if time_b > time_a:
        compute = extrapolate(time_a, time_b, *blocks, layers)
    else:  # noise larger than a block (a busy CPU): scale the larger count's time instead, and say so
        compute = time_b * layers / blocks[1]
        print(f"warning: {blocks[1]} blocks timed no slower than {blocks[0]} ({time_b:.4f} <= {time_a:.4f} s); "
              f"scaled {blocks[1]} blocks' time by {layers}/{blocks[1]}", flush=True)
    return dict(compute_s=compute, collectives=collectives)


def project(measured, one_gpu_s, links):
    """The projection of one (case, N, sharding) from its measured rank share, per link."""
    out = {}
    for link, spec in links.items():
        bandwidth = spec["effective_GBps"] * GB
        comm = {name: c["link_bytes"] / bandwidth for name, c in measured["collectives"].items()}
        hidden = sum(comm.get(name, 0.0) for name in OVERLAPPED)
        step = measured["compute_s"] + sum(comm.values())
        overlap = step - hidden + max(0.0, hidden - measured["compute_s"])
        out[link] = dict(comm_s=sum(comm.values()), step_s=step, step_overlap_s=overlap,
                         speedup=one_gpu_s / step, speedup_overlap=one_gpu_s / overlap)
    return out


def run_projection(cases, gpu_counts, device, dtype, blocks, iters, links=LINKS, log=print, on_case=None):
    """Every case x GPU count x sharding -> list of rows (see the module docstring). on_case(rows)
    after each case."""
    rows, cache = [], {}
    began = time.perf_counter()
    with StandInCollectives() as stand_ins, world_of_one(device) as no_world:
        for case, (size, (width, height), frames, cfg) in cases.items():
            config = dict(model_type="t2v", in_dim=16, **SIZES[size])
            work = Workload(config, (16, (frames - 1) // 4 + 1, height // 8, width // 8), 512, cfg, device, dtype)
            tokens = work.latent[1] * (work.latent[2] // 2) * (work.latent[3] // 2)
            one = measure_rank(work, ParallelDegrees(), False, blocks, iters, stand_ins)
            log(f"[{time.perf_counter() - began:6.1f} s] {case}: 1 GPU {one['compute_s']:.3f} s/step ({tokens} tokens)")
            for count in gpu_counts:
                degrees = choose_degrees(count, config["num_heads"], use_cfg=cfg != 1)
                for shard in (False, True):
                    key = (size, work.latent, cfg != 1, degrees, shard)
                    row = dict(case=case, gpus=count, layout=str(degrees), shard_weights=shard, cfg=cfg,
                               tokens=tokens, one_gpu_s=one["compute_s"])
                    try:  # one failed configuration (sharding's process group, memory) must not cost the rest
                        if shard and no_world:
                            raise RuntimeError(no_world)
                        if key not in cache:
                            cache[key] = measure_rank(work, degrees, shard, blocks, iters, stand_ins)
                    except Exception as error:  # noqa: BLE001 - reported in the row and the table
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(dict(row, error=repr(error)))
                        log(f"{case} x{count} ({degrees}, shard {shard}): FAILED {error!r}")
                        continue
                    measured = cache[key]
                    rows.append(dict(row, **measured, links=project(measured, one["compute_s"], links)))
                    log(f"[{time.perf_counter() - began:6.1f} s] {case} x{count} ({degrees}, "
                        f"{'sharded' if shard else 'whole copies'}): rank compute {measured['compute_s']:.3f} s, "
                        f"{sum(c['link_bytes'] for c in measured['collectives'].values()) / GB:.3f} GB over the link")
            if on_case is not None:
                on_case(rows)
    return rows


# --- measured figures beside the projection -----------------------------------------------------

def load_measured(paths):
    """bench_multi_gpu.py JSON files -> {(case, gpus): [dict(step_s, one_gpu_s, speedup, config, source)]}:
    the distributed and data_parallel rows, each against the 1 GPU row of its own call (file)."""
    found = {}
    for path in paths:
        rows = json.load(open(path))["results"]
        baselines = {r["config"].split(" ")[0]: r["step_s"] for r in rows
                     if r.get("config", "").endswith(" 1 GPU") and "step_s" in r}
        for r in rows:
            parts = r.get("config", "").split(" ")
            if "step_s" not in r or len(parts) != 3 or parts[1] not in ("distributed", "data_parallel"):
                continue
            if parts[0] in baselines:
                found.setdefault((parts[0], r["gpus"]), []).append(dict(
                    step_s=r["step_s"], one_gpu_s=baselines[parts[0]], config=parts[1],
                    speedup=baselines[parts[0]] / r["step_s"], source=os.path.basename(path)))
    return found


def markdown(rows, links, measured=None):
    """The table, labelled as a projection; the measured speed-up and the projection's error beside it."""
    measured = measured or {}
    names = list(links)
    head = ["case", "GPUs", "layout", "weights", "1 GPU s/step (timed)", "rank compute s",
            "link GB/step"] + [f"{n}: s/step (speed-up)" for n in names] + ["measured (NVLink), error of projection"]
    bandwidths = ", ".join(f"{n} {links[n]['effective_GBps']:g} GB/s" for n in names)
    lines = [f"**{LABEL}**: rank 0's compute timed on one GPU + bytes / effective bandwidth ({bandwidths}); "
             "in brackets: with the transfers issued ahead of their use (weight prefetch, ring K/V) hidden "
             "behind compute. Measured: rows of bench_multi_gpu.py, each against its own call's 1 GPU.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            weights = "sharded" if r["shard_weights"] else "whole"
            lines.append(f"| {r['case']} | {r['gpus']} | {r['layout']} | {weights} "
                         f"| failed: {r['error'][:200]} |" + " |" * (len(head) - 5))
            continue
        cells = [r["case"], str(r["gpus"]), r["layout"], "sharded" if r["shard_weights"] else "whole",
                 f"{r['one_gpu_s']:.3f}", f"{r['compute_s']:.3f}",
                 f"{sum(c['link_bytes'] for c in r['collectives'].values()) / GB:.4g}"]
        for n in names:
            p = r["links"][n]
            cell = f"{p['step_s']:.3f} ({p['speedup']:.2f}x)"
            if p["step_overlap_s"] < p["step_s"]:
                cell += f" [{p['step_overlap_s']:.3f}, {p['speedup_overlap']:.2f}x]"
            cells.append(cell)
        found = measured.get((r["case"], r["gpus"]), []) if not r["shard_weights"] else []
        p = r["links"].get("NVLink 4")
        cells.append("; ".join(f"{m['config']} {m['step_s']:.3f} s ({m['speedup']:.2f}x over its 1 GPU "
                               f"{m['one_gpu_s']:.3f} s; {m['source']}): projection "
                               f"{100 * (p['step_s'] / m['step_s'] - 1):+.1f}% s/step, "
                               f"{100 * (p['speedup'] / m['speedup'] - 1):+.1f}% speed-up" for m in found) if p else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows, links, path, measured=None):
    """Projected speed-up against GPU count, one panel per link (dashed: sharded weights; crosses:
    measured speed-ups, on the NVLink panel)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4.2), sharey=True, squeeze=False)
    for axis, link in zip(axes[0], links):
        series = {}
        for r in (r for r in rows if "error" not in r):
            points = series.setdefault((r["case"], r["shard_weights"]), [(1, 1.0)])
            points.append((r["gpus"], r["links"][link]["speedup"]))
        for index, ((case, shard), points) in enumerate(sorted(series.items())):
            axis.plot(*zip(*sorted(points)), marker="o", linestyle="--" if shard else "-",
                      color=f"C{sorted({c for c, _ in series}).index(case)}",
                      label=f"{case}{' sharded' if shard else ''}")
        if link == "NVLink 4":
            for (case, gpus), found in (measured or {}).items():
                if any(r["case"] == case for r in rows):
                    for m in found:
                        axis.plot([gpus], [m["speedup"]], marker="x", color="black", markersize=9)
        top = max(r["gpus"] for r in rows)
        axis.plot([1, top], [1, top], color="grey", linestyle=":", label="linear")
        axis.set(xlabel="GPUs", title=f"{link} ({links[link]['effective_GBps']:g} GB/s)")
        axis.legend(fontsize=6)
    axes[0][0].set_ylabel("projected speed-up over 1 GPU")
    figure.suptitle(f"Wan 2.1 distributed: {LABEL}; x = measured", fontsize=10)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def parse_links(overrides):
    """["NAME=GB/s", ...] -> LINKS with those effective figures replaced or added."""
    links = {name: dict(spec) for name, spec in LINKS.items()}
    for item in overrides or []:
        name, _, value = item.rpartition("=")
        if not name or not value:
            raise ValueError(f"--link {item!r}: give NAME=GB/s, e.g. 'NVLink 4=380'")
        links.setdefault(name, dict(datasheet_GBps=None))["effective_GBps"] = float(value)
    return links


def main(argv=None, dry_run=None):
    """`bench_multi_gpu.py --project` (and `python benchmarks/projection.py`): writes projection.json
    and projection.png into $OUT (or benchmarks/out) and prints the Markdown table."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU in seconds (checks the script)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"from {', '.join(CASES)}")
    parser.add_argument("--measured", nargs="*", default=[], help="bench_multi_gpu.py JSON files to compare with")
    parser.add_argument("--link", action="append", default=[], help="NAME=GB/s: an effective bandwidth of your own")
    parser.add_argument("--blocks", default=None,
                        help="the two block counts timed, e.g. 1,3 (default 1,3; dry run 1,2)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps per point, after the counted one (default 2; dry run 3)")
    args = parser.parse_args(argv)
    dry = args.dry_run if dry_run is None else dry_run
    if dry:
        cases, device, dtype = DRY_CASES, torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("the projection times the rank's share on a GPU; without one, use --dry-run")
        unknown = [c for c in args.cases.split(",") if c not in CASES]
        if unknown:
            parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
        cases, device, dtype = {c: CASES[c] for c in args.cases.split(",")}, torch.device("cuda", 0), torch.bfloat16
        torch.cuda.set_device(device)
        # one process sees every layout's shard length: the fused kernels compile once per shape
        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across PyTorch versions
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    blocks = tuple(int(b) for b in (args.blocks or ("1,2" if dry else "1,3")).split(","))
    iters = args.iters or (3 if dry else 2)
    links = parse_links(args.link)
    try:  # read first: a wrong path fails before the GPU work
        measured = load_measured(args.measured)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--measured: {error!r} (give bench_multi_gpu.py's multi_gpu.json files)")
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    began = time.perf_counter()
    info = dict(label=LABEL, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, dry_run=dry, blocks_timed=blocks, iters=iters, links=links,
                measured_files=args.measured)

    def save(rows):  # after every case too: a run cut short still brings its rows back
        info["seconds"] = time.perf_counter() - began
        with open(os.path.join(out, "projection.json"), "w") as f:
            json.dump(dict(info=info, results=rows,
                           measured={f"{c} x{g}": m for (c, g), m in measured.items()}), f, indent=1)

    rows = run_projection(cases, GPU_COUNTS, device, dtype, blocks, iters, links, on_case=save)
    save(rows)
    print(f"\n## Multi-GPU step time: {LABEL}\n\n{info['device']}, torch {info['torch']}, "
          f"{info['seconds']:.0f} s\n\n{markdown(rows, links, measured)}\n", flush=True)
    try:
        chart(rows, links, os.path.join(out, "projection.png"), measured)
    except ImportError as error:  # the table and the JSON are out already
        print(f"no chart: {error} (pip install matplotlib)")
    return rows


if __name__ == "__main__":
    main()
