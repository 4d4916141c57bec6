"""Weight sharding for the distributed strategy: each rank keeps 1/N of every weight (FSDP2).

Without sharding every worker holds a whole copy (Wan 14B in bf16: 28 GB on every GPU). With
`shard_weights`, `fully_shard` (torch.distributed.fsdp, PyTorch 2.6+) splits every parameter by
rows over all ranks of the world, one FSDP unit per block plus one for the rest (embeddings, head).
A block's weights are all-gathered just before it runs and freed after; the next block's gather
is issued while the current block computes (explicit forward prefetch). Sequence and CFG
parallelism keep their own process groups: every rank runs the same blocks in the same order (CFG
groups run their own branch through the same blocks), so the world's per-block gathers line up.

Loading never holds the whole model: the model is built on the meta device, sharded, given storage
for this rank's rows only (`to_empty`), and every parameter's rows are filled from the
memory-mapped safetensors file, one tensor at a time. When the file's values are used as they are,
only this rank's rows are read. A whole tensor (one, not the model) is read where a whole-tensor
step comes first: quantizing to fp8 takes its scale over the whole tensor, and LoRAs are merged
into the whole tensor before it is sliced, with wanvideo.lora's float32 arithmetic, so sharded and
unsharded models hold the same numbers.

fp8 storage: FP8Linear weights stay fp8 parameters, sharded like any other. A block mixes fp8 and
bf16 parameters, which FSDP2 all-gathers as one uint8 byte buffer (any backend carries bytes); the
per-tensor `scale_weight` is a buffer, replicated on every rank (4 bytes each).
"""
import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ...checkpoint import SAFETENSORS_DTYPES, check_keys, open_checkpoint, build_meta_model, inspect_checkpoint, resolve_dtype
from ...devices import DeviceOutOfMemoryError, release_memory
from ...gpus import get_gpu_info
from ...lora import collect_lora_updates, merge_lora_updates
from ...pipeline import apply_engine
from ...quantization import FP8_DTYPES, FP8Linear, quantize_weight

logger = logging.getLogger(__name__)

SHARD_WEIGHTS_CHOICES = ("off", "on", "auto")
# What 'auto' keeps free next to a whole copy besides the caller's activation reserve: CUDA
# context, cuBLAS workspaces, allocator slack (the planner's RUNTIME_RESERVE_BYTES).
AUTO_RUNTIME_RESERVE_BYTES = 2**30


def check_shard_weights(value):
    """'off' / 'on' / 'auto' (or a bool) -> the same as a string; ValueError naming the value."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in SHARD_WEIGHTS_CHOICES:
        raise ValueError(f"shard_weights={value!r} is not one of {', '.join(map(repr, SHARD_WEIGHTS_CHOICES))}: "
                         "'on' splits the weights over the workers, 'off' gives each a whole copy, 'auto' shards "
                         "only when a whole copy does not fit a GPU.")
    return value


@functools.lru_cache(maxsize=1)
def fsdp2_missing():
    """None when this PyTorch has FSDP2 (torch.distributed.fsdp.fully_shard, 2.6+), else why not.
    (Asked only where sharding is wanted: the import takes a second or more.)"""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return (f"weight sharding needs PyTorch 2.6 or newer (torch.distributed.fsdp.fully_shard); this is "
                f"{torch.__version__} ({error})")
    return None


def whole_copy_bytes(info, base_precision="bf16", quantization="disabled"):
    """Bytes of every weight of the model in this precision (what each worker holds unsharded)."""
    block_bytes, other_bytes = info.bytes_at(resolve_dtype(base_precision), quantization)
    return info.num_layers * block_bytes + other_bytes


def free_memory_by_device(devices):
    """{device: free bytes, None for the CPU} from NVML (wanvideo.gpus), which, unlike
    torch.cuda.mem_get_info, opens no CUDA context on the workers' GPUs in this process."""
    devices = [torch.device(d) for d in devices]
    by_index = {g["index"]: g["free_memory"] for g in get_gpu_info()} if any(d.type == "cuda" for d in devices) else {}
    return {d: by_index.get(d.index) if d.type == "cuda" else None for d in devices}


def resolve_shard_weights(shard_weights, info, devices, base_precision="bf16", quantization="disabled",
                          reserve_bytes=0, free_memory=None):
    """Whether the workers shard their weights -> (bool, reason).

    'auto' shards when a whole copy plus `reserve_bytes` (the caller's activation estimate per GPU)
    and AUTO_RUNTIME_RESERVE_BYTES exceeds the free memory of any device; devices without a memory
    figure (CPU) keep whole copies. free_memory: {device: bytes or None} (default: read now)."""
    choice = check_shard_weights(shard_weights)
    if choice == "on" and fsdp2_missing():
        raise ValueError(f"shard_weights='on': {fsdp2_missing()}. Upgrade PyTorch, or set shard_weights to 'off'.")
    if choice != "auto":
        return choice == "on", f"shard_weights='{choice}'"
    whole = whole_copy_bytes(info, base_precision, quantization)
    need = whole + reserve_bytes + AUTO_RUNTIME_RESERVE_BYTES
    free = free_memory_by_device(devices) if free_memory is None else free_memory
    short = {d: f for d, f in free.items() if f is not None and f < need}
    if not short:
        measured = [f for f in free.values() if f is not None]
        return False, (f"shard_weights='auto': a whole copy ({whole / 2**30:.1f} GiB of weights, "
                       f"{need / 2**30:.1f} GiB with activations and runtime) fits "
                       + (f"every GPU (least free: {min(measured) / 2**30:.1f} GiB)" if measured else
                          "(no memory figure for CPU devices)") + ", so every worker holds one")
    device, available = min(short.items(), key=lambda item: item[1])
    if fsdp2_missing():
        logger.warning("A whole copy of the weights does not fit %s, but %s: every worker loads a whole copy.",
                       device, fsdp2_missing())
        return False, f"shard_weights='auto': a whole copy does not fit {device}, but {fsdp2_missing()}"
    return True, (f"shard_weights='auto': a whole copy ({whole / 2**30:.1f} GiB of weights, {need / 2**30:.1f} GiB "
                  f"with activations and runtime) does not fit {device} ({available / 2**30:.1f} GiB free), so "
                  f"each of the {len(free)} workers holds 1/{len(free)} of the weights")


@dataclass
class ShardedLoadReport:
    """What one rank holds and read. local_bytes: its shards of the parameters (the buffers,
    fp8 scales, are replicated and not counted); model_bytes: every parameter of the model in this
    precision; largest_read_bytes: the largest tensor (or slice of rows) read from the file at once;
    read_bytes: all bytes read from the file by this rank."""
    rank: int
    world_size: int
    local_bytes: int = 0
    model_bytes: int = 0
    largest_read_bytes: int = 0
    read_bytes: int = 0

    def summary(self):
        return (f"rank {self.rank} of {self.world_size} holds {self.local_bytes / 2**20:,.1f} MiB of "
                f"{self.model_bytes / 2**20:,.1f} MiB of weights; read {self.read_bytes / 2**20:,.1f} MiB from the "
                f"file, at most {self.largest_read_bytes / 2**20:,.1f} MiB at once")


def shard_rows(length, world_size, rank):
    """FSDP2's split of dim 0 (torch.chunk's): ceil(length / world_size) rows per rank, the last
    ranks fewer or none -> (start, stop)."""
    per_rank = -(-length // world_size)
    start = min(rank * per_rank, length)
    return start, min(start + per_rank, length)


def _meta_model_in_storage_dtypes(info, dtype, quantization):
    """The model on the meta device with every parameter in the dtype it is stored in: fp8 for the
    FP8Linear weights under quantization, `dtype` for the rest (as load_wan_model leaves them)."""
    model = build_meta_model(info.config, quantization)
    fp8_dtype = FP8_DTYPES.get(quantization)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            stored = fp8_dtype if isinstance(module, FP8Linear) and name == "weight" else dtype
            setattr(module, name, nn.Parameter(torch.empty_like(param, dtype=stored), requires_grad=False))
    return model


def shard(model, device, prefetch):
    """fully_shard per block, then the root (embeddings, head) over a mesh of every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # Explicit: the root's default keeps its weights gathered after a forward (made for training,
    # where backward follows at once); in inference that would hold embeddings and head whole.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    if prefetch:  # gather the next block while this one computes (the root: block 0 during the embedding)
        model.set_modules_to_forward_prefetch([model.blocks[0]])
        for block, following in zip(model.blocks, model.blocks[1:]):
            block.set_modules_to_forward_prefetch([following])


class _TensorSource:
    """One tensor (or rows of it) at a time from the open checkpoint, on `device`, counting what is read."""

    def __init__(self, handle, info, device, report):
        self.handle, self.info, self.device, self.report = handle, info, device, report
        self.keys = set(info.keys)

    def _count(self, tensor):
        self.report.read_bytes += tensor.nbytes
        self.report.largest_read_bytes = max(self.report.largest_read_bytes, tensor.nbytes)
        return tensor

    def stored_dtype(self, key):
        return SAFETENSORS_DTYPES[self.handle.get_slice(self.info.prefix + key).get_dtype()]

    def whole(self, key):
        return self._count(self.handle.get_tensor(self.info.prefix + key)).to(self.device)

    def rows(self, key, start, stop):
        return self._count(self.handle.get_slice(self.info.prefix + key)[start:stop]).to(self.device)

    def scale_of(self, key):
        """The file's float32 per-tensor scale of weight `key` (scaled fp8 files), or None."""
        scale_key = key.rpartition(".")[0] + ".scale_weight"
        return self.whole(scale_key).float() if key.endswith(".weight") and scale_key in self.keys else None


def _rows_as_loaded(source, key, rows, param_dtype, fp8_dtype, updates):
    """This rank's rows of parameter `key` as load_wan_model then apply_loras leave the whole
    parameter -> (rows, fp8 scale or None). A function of its own: the whole tensor it may read dies
    on return, so no two tensors of the file are ever held together."""
    start, stop = rows
    file_scale = source.scale_of(key)
    if param_dtype == fp8_dtype:  # an FP8Linear weight: wanvideo.checkpoint._to_fp8, then _merge
        if source.stored_dtype(key) == fp8_dtype and not updates:  # the file's bytes, kept: rows suffice
            scale = file_scale if file_scale is not None else torch.ones((), device=source.device)
            return source.rows(key, start, stop), scale.to(torch.float32)
        tensor = source.whole(key)
        if source.stored_dtype(key) == fp8_dtype:
            weight, scale = tensor, (file_scale if file_scale is not None else torch.ones((), device=source.device))
        else:
            if file_scale is not None:
                tensor = tensor.to(torch.float32) * file_scale
            weight, scale = quantize_weight(tensor, fp8_dtype)
        scale = scale.to(torch.float32)
        if updates:  # FP8Linear.dequantized_weight(float32) + the LoRAs, re-quantized once
            merged = merge_lora_updates(weight.to(torch.float32) * scale, updates)
            weight, scale = quantize_weight(merged, fp8_dtype)
        return weight[start:stop], scale.to(torch.float32)
    if not updates:  # element-wise conversions only: this rank's rows are all it reads
        part = source.rows(key, start, stop)
        return (part.to(torch.float32) * file_scale if file_scale is not None else part).to(param_dtype), None
    tensor = source.whole(key)
    if file_scale is not None:
        tensor = tensor.to(torch.float32) * file_scale
    return merge_lora_updates(tensor.to(param_dtype).float(), updates).to(param_dtype)[start:stop], None


def _fill_local_shards(model, source, fp8_dtype, updates, report):
    rank, world_size = report.rank, report.world_size
    for key, param in model.named_parameters():
        local = param.to_local()
        start, stop = shard_rows(param.shape[0], world_size, rank)
        if local.shape[0] != stop - start:
            raise RuntimeError(f"{key}: FSDP placed {local.shape[0]} rows on rank {rank}, expected rows {start}-{stop} "
                               f"of {param.shape[0]}; this PyTorch splits parameters differently than "
                               "torch.chunk. Turn shard_weights off.")
        rows, scale = _rows_as_loaded(source, key, (start, stop), param.dtype, fp8_dtype, updates.get(key))
        local.copy_(rows)
        if scale is not None:
            model.get_submodule(key.rpartition(".")[0]).scale_weight.copy_(scale)
        del rows  # may be a view of a whole tensor: let it go before the next one is read
        report.local_bytes += local.nbytes
        report.model_bytes += param.numel() * param.element_size()
    scales_filled = {key + ".scale_weight" for key, module in model.named_modules() if isinstance(module, FP8Linear)}
    for key, buffer in model.named_buffers():
        if key not in scales_filled:  # none in Wan 2.1; any persistent buffer comes whole from the file
            buffer.copy_(source.whole(key).to(buffer.dtype))


def load_sharded_model(path, device, settings, info=None, prefetch=True):
    """This rank's shard of the model in `path`, computing on `device`: every parameter split by
    rows over all ranks of the default process group (which must be initialised) -> (model, info,
    ShardedLoadReport).

    settings: a wanvideo.pipeline.LoadSettings (precision, quantization, attention, LoRAs merged
    before sharding; fp8 fast matmuls applied after). Neither block swap nor compile combines
    with sharding. Every rank of the world must call this at the same point, and afterwards run
    the same forwards in the same order. Nothing stays allocated on a failure.
    """
    if settings.swaps_blocks or settings.compile_args is not None:
        raise ValueError("Weight sharding gathers each block from the other workers as it runs; it does not combine "
                         "with block swap or torch.compile. Disconnect those settings or turn shard_weights off.")
    path, device = os.fspath(path), torch.device(device)
    info = info or inspect_checkpoint(path)
    dtype, fp8_dtype = resolve_dtype(settings.base_precision), FP8_DTYPES.get(settings.quantization)
    report = ShardedLoadReport(dist.get_rank(), dist.get_world_size())
    model = _meta_model_in_storage_dtypes(info, dtype, settings.quantization)
    check_keys(info, model.state_dict().keys())
    # LoRA keys are matched against the names and shapes of the meta model, then merged tensor by tensor.
    updates = collect_lora_updates(model, settings.loras)[0] if settings.loras else {}
    try:
        shard(model, device, prefetch)
        model.to_empty(device=device)  # this rank's rows only (FSDP keeps its padded shard storage)
        with torch.no_grad(), open_checkpoint(path) as handle:
            _fill_local_shards(model, _TensorSource(handle, info, device, report), fp8_dtype, updates, report)
        model.set_attention_backend(settings.attention_mode)
        model.eval()
        model.checkpoint_info = info
        apply_engine(model, [device], settings)  # fp8 fast matmuls where asked (no swap, no compile here)
    except torch.OutOfMemoryError as error:
        del model
        release_memory()
        raise DeviceOutOfMemoryError(f"Out of memory on {device} while loading this rank's shard of "
                                     f"{info.summary()}.", device) from error
    except BaseException:
        del model
        release_memory()
        raise
    logger.info("Loaded a shard of %s: %s", info.summary(), report.summary())
    return model, info, report
