"""Block swap: transformer blocks kept in pinned CPU memory and streamed to the GPU just in time.

The model is not edited; hooks act on it from outside (in the manner of accelerate's hooks):
  - the tensors of each swapped block (parameters and buffers, any mix of dtypes: fp8 weights,
    bf16 biases, fp32 scales) are packed into one page-locked host byte buffer at aligned offsets,
    and every tensor of the block becomes a typed view of it (`tensor.data = view`);
  - a ring of `ring_size` device byte buffers ("slots"), each as large as the largest packed block,
    is allocated once; uploading a block is ONE host-to-device copy of its packed buffer into a slot,
    on a dedicated copy stream, after which the block's tensors are pointed at typed views of the slot;
  - CUDA events order the two streams: compute waits for a block's upload before running it, and a
    slot is overwritten only after the compute that read it has finished. The host never waits, so
    it runs ahead of the GPU and every copy is queued long before it is needed;
  - a forward pre-hook on each swapped block makes it resident (uploading it on demand if no
    prefetch did); a forward post-hook points the block back at host memory and prefetches the next
    `prefetch_blocks` swapped blocks in order, wrapping around to the first swapped block for the
    next step. Any block runner (sequential, pipelined, distributed) therefore works, and
    `block.forward` stays untouched so that torch.compile can wrap it.

The FIRST `blocks_to_swap` blocks are swapped (as ComfyUI-WanVideoWrapper does, so a number means
the same blocks there and here). Their upload for the next step is queued when the last swapped
block finishes, and hides behind the resident tail of the step (blocks N..L-1), the head, the
sampler's update and the next step's embedding; every other upload hides behind the compute of the
swapped block before it.

Page-locked memory: the host buffers are ordinary CPU allocations registered with the driver
(cudaHostRegister), sized exactly. PyTorch's pinned allocator (`pin_memory()`) rounds every
allocation up to a power of two, which for a 700 MB 14B block wastes 46% of the host memory it
pins. Registration falls back to that allocator, then to pageable memory, with a warning.

On devices without streams (CPU) the same logic runs with synchronous copies and no-op events, so
tests exercise placement, ordering and slot reuse.

This file is longer than the package's usual ~450 lines on purpose: the host buffers, the device
slots, the two streams and the hooks share one invariant (no slot is overwritten before the
compute that reads it has finished; no host buffer is freed while a copy may read it), and keeping
them side by side keeps that invariant in one place.
"""
import contextlib
import logging
import math
import numbers
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from ..devices import free_bytes

logger = logging.getLogger(__name__)

__all__ = ["BlockSwapSettings", "BlockSwapper", "enable_block_swap", "get_block_swapper"]

ALIGNMENT = 256            # bytes between packed tensors: aligned views for vectorised loads and fp8 GEMMs
PAGE_SIZE = 4096           # registered ranges cover whole pages, so no page is shared with another allocation
UPLOAD_LOG_LENGTH = 100_000
CUDA_HOST_REGISTER_PORTABLE = 1   # pinned for every CUDA context, so other GPUs' copies are fast too
_SWAPPER_ATTRIBUTE = "_wanvideo_block_swapper"


@dataclass
class BlockSwapSettings:
    """How to swap.

    blocks_to_swap:   number of transformer blocks kept in CPU memory (the first N blocks).
    prefetch_blocks:  swapped blocks uploaded ahead of use; 0 uploads each in its own pre-hook
                      (still asynchronous on the copy stream). The ring holds prefetch_blocks + 1
                      slots (at least 2, at most blocks_to_swap).
    use_non_blocking: asynchronous host-to-device copies; False makes the host wait for each copy
                      (for debugging: it removes the overlap).
    offload_txt_emb:  keep text_embedding in CPU memory, uploaded for each forward.
    offload_img_emb:  keep img_emb (i2v / flf2v CLIP projection) in CPU memory likewise.
    """
    blocks_to_swap: int = 0
    prefetch_blocks: int = 1
    use_non_blocking: bool = True
    offload_txt_emb: bool = False
    offload_img_emb: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self, num_blocks=None):
        """Raise a clear error for a bad value; with num_blocks, also check blocks_to_swap against it."""
        for name in ("blocks_to_swap", "prefetch_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be a whole number; got {value!r}.")
            if value < 0:
                raise ValueError(f"{name} must be 0 or more; got {value}.")
            setattr(self, name, int(value))
        for name in ("use_non_blocking", "offload_txt_emb", "offload_img_emb"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        if num_blocks is not None and self.blocks_to_swap > num_blocks:
            raise ValueError(f"blocks_to_swap={self.blocks_to_swap} is more than the model's {num_blocks} blocks; "
                             f"choose 0 to {num_blocks}.")

    def ring_size(self):
        """Device slots for swapped blocks: one per block in flight ahead plus the one running."""
        return min(max(self.prefetch_blocks + 1, 2), self.blocks_to_swap)


def _round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


def _typed_view(byte_buffer, offset, dtype, shape):
    """A [shape] tensor of `dtype` over byte_buffer[offset:] (a uint8 tensor)."""
    nbytes = math.prod(shape) * dtype.itemsize
    return byte_buffer[offset:offset + nbytes].view(dtype).view(shape)


class _Layout:
    """Where each tensor of a module goes in one packed byte buffer.

    tensors: the module's parameters and buffers, each once (tied tensors are packed once);
    entries: (offset, dtype, shape) per tensor; nbytes: size of the packed buffer.
    """

    def __init__(self, module, name):
        self.name = name
        self.tensors = list(module.parameters()) + list(module.buffers())
        self.entries, offset = [], 0
        for tensor in self.tensors:
            offset = _round_up(offset, ALIGNMENT)
            self.entries.append((offset, tensor.dtype, tuple(tensor.shape)))
            offset += tensor.numel() * tensor.element_size()
        self.nbytes = offset

    def views(self, byte_buffer):
        return [_typed_view(byte_buffer, offset, dtype, shape) for offset, dtype, shape in self.entries]

    def point_at(self, views):
        for tensor, view in zip(self.tensors, views):
            tensor.data = view


def _consume_stale_cuda_error(device):
    """A failed runtime call (cudaHostRegister) leaves its error as the thread's 'last error', which
    PyTorch's next kernel-launch check would report as its own. Launching a tiny kernel consumes it."""
    try:
        torch.empty(1, device=device).fill_(0)
    except RuntimeError:
        pass


def _unregister_host_memory(pointer, device):
    """Finalizer of a registered buffer: wait for copies that may still read it, then unpin it."""
    try:
        torch.cuda.synchronize(device)
        error = int(torch.cuda.cudart().cudaHostUnregister(pointer))
        if error != 0:
            _consume_stale_cuda_error(device)
            logger.warning("cudaHostUnregister failed with CUDA error %d; the host memory stays pinned.", error)
    except Exception as error:  # a finalizer must not raise
        logger.warning("Could not unpin block-swap host memory: %s", error)


class _HostBuffer:
    """A CPU byte buffer of `nbytes`, page-locked when the compute device is CUDA.

    mode: 'registered' (exact size, cudaHostRegister), 'pinned' (PyTorch's pinned allocator,
    rounded up to a power of two), or 'pageable' (CPU devices, or when pinning failed).
    """

    def __init__(self, nbytes, device):
        self._finalizer = None
        self.mode = "pageable"
        self.tensor = self._registered(nbytes, device) if device.type == "cuda" else None
        if self.tensor is None and device.type == "cuda":
            self.tensor = self._pinned(nbytes)
        if self.tensor is None:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8)

    def _registered(self, nbytes, device):
        padded = _round_up(max(nbytes, 1), PAGE_SIZE)
        raw = torch.empty(padded + PAGE_SIZE, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE_SIZE
        pages = raw[start:start + padded]
        error = int(torch.cuda.cudart().cudaHostRegister(pages.data_ptr(), padded, CUDA_HOST_REGISTER_PORTABLE))
        if error != 0:
            _consume_stale_cuda_error(device)
            logger.warning("cudaHostRegister of %.0f MB failed (CUDA error %d); using PyTorch's pinned allocator, "
                           "which rounds each block's buffer up to a power of two.", padded / 1e6, error)
            return None
        # Unpin when the buffer object goes (remove() calls it early); not at exit, when CUDA may be gone.
        self._finalizer = weakref.finalize(self, _unregister_host_memory, pages.data_ptr(), device)
        self._finalizer.atexit = False
        self.mode = "registered"
        return pages[:nbytes]

    def _pinned(self, nbytes):
        try:
            tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as error:
            logger.warning("Could not pin %.0f MB of host memory (%s); block swap copies from pageable memory, "
                           "about 3x slower.", nbytes / 1e6, error)
            return None
        self.mode = "pinned"
        return tensor

    def release(self):
        """Unpin now (the caller has synchronised) and drop the memory."""
        if self._finalizer is not None:
            self._finalizer()
        self.tensor = None


class _PackedModule:
    """A module whose tensors live in one host byte buffer: `host_views` are its tensors' home."""

    def __init__(self, module, name, device):
        self.module = module
        self.layout = _Layout(module, name)
        self.host = _HostBuffer(self.layout.nbytes, device)
        self.host_views = self.layout.views(self.host.tensor)
        with torch.no_grad():
            for tensor, view in zip(self.layout.tensors, self.host_views):
                view.copy_(tensor.detach())
                tensor.data = view  # the original storage is freed here, so RAM peaks at one block

    @property
    def nbytes(self):
        return self.layout.nbytes

    def restore_to(self, device):
        """Give every tensor its own storage on `device` (a copy, so the host buffer can go)."""
        for tensor, view in zip(self.layout.tensors, self.host_views):
            tensor.data = view.to(device, copy=True)

    def release(self):
        self.host_views = []
        self.host.release()


class _CudaStreams:
    """A copy stream beside the compute stream, ordered by events."""

    def __init__(self, device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def new_event(self):
        return torch.cuda.Event()

    def copying(self):
        return torch.cuda.stream(self.copy_stream)

    def record_on_copy(self, event):
        event.record(self.copy_stream)

    def record_on_compute(self, event):
        event.record(torch.cuda.current_stream(self.device))

    def copy_waits(self, event):
        self.copy_stream.wait_event(event)

    def compute_waits(self, event):
        torch.cuda.current_stream(self.device).wait_event(event)

    def attach_slot(self, slot):
        # The slot is written on the copy stream: if it is ever freed, the allocator must not hand
        # its memory out again before the copies queued there are done.
        slot.record_stream(self.copy_stream)

    def synchronize(self):
        self.copy_stream.synchronize()
        torch.cuda.synchronize(self.device)


class _SynchronousStreams:
    """The stand-in where there are no streams (CPU): copies finish before they return."""

    def __init__(self, device):
        self.device = device

    def new_event(self):
        return None

    def copying(self):
        return contextlib.nullcontext()

    def record_on_copy(self, event):
        pass

    def record_on_compute(self, event):
        pass

    def copy_waits(self, event):
        pass

    def compute_waits(self, event):
        pass

    def attach_slot(self, slot):
        pass

    def synchronize(self):
        pass


def _module_tensors(module):
    return list(module.parameters()) + list(module.buffers())


def _compile_safe(hook):
    """Hooks stay eager under torch.compile (they swap tensors and order streams, nothing to trace)."""
    return torch.compiler.disable(hook)


class BlockSwapper:
    """Block swap applied to a WanModel; made by `enable_block_swap`, undone by `remove()`.

    swapped_block_indices: indices into model.blocks kept in host memory (0..N-1).
    upload_log: block indices in the order their uploads were issued (the last UPLOAD_LOG_LENGTH).
    on_demand_uploads: uploads issued by a pre-hook because no prefetch had (1 per run in steady state).
    ring_size, slot_bytes: the device slots; pinned_mode: how the host buffers are held.
    Not thread-safe: one forward at a time.
    """

    def __init__(self, model, device, settings):
        self.model, self.device, self.settings = model, device, settings
        self.swapped_block_indices = list(range(settings.blocks_to_swap))
        self.ring_size = settings.ring_size() if self.swapped_block_indices else 0
        self._position = {index: position for position, index in enumerate(self.swapped_block_indices)}
        self.upload_log = deque(maxlen=UPLOAD_LOG_LENGTH)
        self.on_demand_uploads = 0
        self.removed = False
        self._streams = _CudaStreams(device) if device.type == "cuda" else _SynchronousStreams(device)
        self._packed_blocks = {}          # block index -> _PackedModule
        self._packed_embeddings = {}      # attribute name -> _PackedModule
        self._hook_handles = []
        self._slots = []                  # ring of device byte buffers
        self._slot_views = {}             # (block index, slot) -> typed views of the slot
        self._slot_owner = []             # block index whose bytes the slot holds, or None
        self._slot_running = []           # the slot's block is between its pre- and post-hook
        self._slot_ready = []             # event: the slot's upload finished (copy stream)
        self._slot_free = []              # event: the last compute reading the slot finished
        self._block_slot = {}             # block index -> slot holding it
        self._next_slot = 0               # FIFO cursor: uploads follow execution order, so FIFO evicts the oldest
        self._embedding_device_bytes = {}  # attribute name -> device copy during its forward

    # --- placement -----------------------------------------------------------------------------

    def _offloaded_embedding_names(self):
        names = []
        for name, wanted in (("text_embedding", self.settings.offload_txt_emb),
                             ("img_emb", self.settings.offload_img_emb)):
            if wanted and getattr(self.model, name, None) is not None:
                names.append(name)
            elif wanted:
                logger.info("offload_%s is set but the model has no %s; nothing to offload.",
                            "txt_emb" if name == "text_embedding" else "img_emb", name)
        return names

    def _check_device_memory(self, embedding_names):
        """Before touching anything: will the resident part and the slots fit on the device?"""
        if self.device.type != "cuda":
            return
        modules = [self.model.blocks[i] for i in self.swapped_block_indices]
        modules += [getattr(self.model, name) for name in embedding_names]
        managed = {id(t) for module in modules for t in _module_tensors(module)}
        incoming = leaving = 0
        for tensor in _module_tensors(self.model):
            nbytes = tensor.numel() * tensor.element_size()
            on_device = tensor.device == self.device
            if id(tensor) in managed:
                leaving += nbytes if on_device else 0
            elif not on_device:
                incoming += nbytes
        block_sizes = [_Layout(self.model.blocks[i], f"block {i}").nbytes for i in self.swapped_block_indices]
        slots = self.ring_size * max(block_sizes, default=0)
        available = free_bytes(self.device) + leaving
        if incoming + slots > available:
            block = _Layout(self.model.blocks[-1], "a block").nbytes
            more = math.ceil((incoming + slots - available) / block)
            raise MemoryError(
                f"Block swap of {self.settings.blocks_to_swap} blocks needs {(incoming + slots) / 2**30:.2f} GiB on "
                f"{self.device} for the resident blocks, embeddings and {self.ring_size} slots, but only "
                f"{available / 2**30:.2f} GiB are free. Swap at least {more} more blocks (up to "
                f"{len(self.model.blocks)}), or use fp8 quantization.")

    def _place(self, embedding_names):
        for index in self.swapped_block_indices:
            self._packed_blocks[index] = _PackedModule(self.model.blocks[index], f"block {index}", self.device)
        for name in embedding_names:
            self._packed_embeddings[name] = _PackedModule(getattr(self.model, name), name, self.device)
        managed = {id(t) for packed in self._all_packed() for t in packed.layout.tensors}
        self._allocate_slots()
        with torch.no_grad():
            for tensor in _module_tensors(self.model):
                if id(tensor) not in managed and tensor.device != self.device:
                    tensor.data = tensor.data.to(self.device)
        for index in self.swapped_block_indices:
            block = self.model.blocks[index]
            self._hook_handles.append(block.register_forward_pre_hook(_compile_safe(self._make_pre_hook(index))))
            self._hook_handles.append(block.register_forward_hook(_compile_safe(self._make_post_hook(index)),
                                                                  always_call=True))
        for name in self._packed_embeddings:
            module = getattr(self.model, name)
            upload, release = self._make_embedding_upload(name), self._make_embedding_release(name)
            self._hook_handles.append(module.register_forward_pre_hook(_compile_safe(upload)))
            self._hook_handles.append(module.register_forward_hook(_compile_safe(release), always_call=True))

    def _allocate_slots(self):
        slot_bytes = max((packed.nbytes for packed in self._packed_blocks.values()), default=0)
        for _ in range(self.ring_size):
            slot = torch.empty(slot_bytes, dtype=torch.uint8, device=self.device)
            self._streams.attach_slot(slot)
            self._slots.append(slot)
            self._slot_owner.append(None)
            self._slot_running.append(False)
            self._slot_ready.append(self._streams.new_event())
            self._slot_free.append(self._streams.new_event())
        for index, packed in self._packed_blocks.items():  # made once: no allocation per block per step
            for slot_index, slot in enumerate(self._slots):
                self._slot_views[index, slot_index] = packed.layout.views(slot)

    def _all_packed(self):
        return list(self._packed_blocks.values()) + list(self._packed_embeddings.values())

    # --- uploads and the ring ------------------------------------------------------------------

    def _choose_slot(self, keep):
        """The oldest slot whose block is neither running nor in `keep` (blocks about to run)."""
        for step in range(self.ring_size):
            slot = (self._next_slot + step) % self.ring_size
            if not self._slot_running[slot] and self._slot_owner[slot] not in keep:
                self._next_slot = (slot + 1) % self.ring_size
                return slot
        raise RuntimeError(f"All {self.ring_size} block-swap slots hold blocks that are running; a block runner "
                           "ran more swapped blocks at once than there are slots. Raise prefetch_blocks to at least "
                           "the number of blocks it runs at once.")

    def _upload(self, index, keep=()):
        """Queue the copy of block `index` into a free slot on the copy stream; returns the slot."""
        slot = self._choose_slot(set(keep) | {index})
        evicted = self._slot_owner[slot]
        if evicted is not None:
            del self._block_slot[evicted]
        packed = self._packed_blocks[index]
        with self._streams.copying():
            self._streams.copy_waits(self._slot_free[slot])  # the compute that read the slot is done
            self._slots[slot][:packed.nbytes].copy_(packed.host.tensor, non_blocking=self.settings.use_non_blocking)
            self._streams.record_on_copy(self._slot_ready[slot])
        self._slot_owner[slot], self._block_slot[index] = index, slot
        self.upload_log.append(index)
        return slot

    def _upcoming(self, index):
        """The swapped blocks expected after `index`, wrapping around to the start of the next step."""
        order, position = self.swapped_block_indices, self._position[index]
        count = min(self.settings.prefetch_blocks, len(order) - 1)
        return [order[(position + step) % len(order)] for step in range(1, count + 1)]

    def _make_pre_hook(self, index):
        def before_block(module, args):
            slot = self._block_slot.get(index)
            if slot is None:  # first call, or run out of the expected order: upload now
                slot = self._upload(index)
                self.on_demand_uploads += 1
            self._slot_running[slot] = True
            self._streams.compute_waits(self._slot_ready[slot])
            self._packed_blocks[index].layout.point_at(self._slot_views[index, slot])
        return before_block

    def _make_post_hook(self, index):
        def after_block(module, args, output):
            slot = self._block_slot.get(index)
            if slot is None or not self._slot_running[slot]:
                return None  # the pre-hook did not run (an earlier hook raised): nothing to release
            self._streams.record_on_compute(self._slot_free[slot])
            self._slot_running[slot] = False
            packed = self._packed_blocks[index]
            packed.layout.point_at(packed.host_views)  # nothing outside the ring refers to the slot now
            upcoming = self._upcoming(index)
            for target in upcoming:
                if target not in self._block_slot:
                    self._upload(target, keep=upcoming)
            return None
        return after_block

    def _make_embedding_upload(self, name):
        def before_embedding(module, args):
            packed = self._packed_embeddings[name]
            device_bytes = torch.empty(packed.nbytes, dtype=torch.uint8, device=self.device)
            # On the compute stream: runs once per forward, and stream order makes it safe without events.
            device_bytes.copy_(packed.host.tensor, non_blocking=self.settings.use_non_blocking)
            self._embedding_device_bytes[name] = device_bytes
            packed.layout.point_at(packed.layout.views(device_bytes))
        return before_embedding

    def _make_embedding_release(self, name):
        def after_embedding(module, args, output):
            packed = self._packed_embeddings[name]
            packed.layout.point_at(packed.host_views)
            self._embedding_device_bytes.pop(name, None)  # stream-ordered reuse by the caching allocator
            return None
        return after_embedding

    # --- introspection -------------------------------------------------------------------------

    @property
    def slot_bytes(self):
        return self._slots[0].numel() if self._slots else 0

    @property
    def pinned_mode(self):
        modes = sorted({packed.host.mode for packed in self._all_packed()})
        return "+".join(modes) if modes else "none"

    def pinned_bytes(self):
        """Bytes of the host buffers (swapped blocks and offloaded embeddings), as packed."""
        return sum(packed.nbytes for packed in self._all_packed())

    def resident_bytes(self):
        """Bytes this model keeps on the compute device: its unswapped tensors plus the slot ring."""
        managed = {id(t) for packed in self._all_packed() for t in packed.layout.tensors}
        model_bytes = sum(t.numel() * t.element_size()
                          for t in _module_tensors(self.model)
                          if id(t) not in managed and t.device == self.device)
        return model_bytes + sum(slot.numel() for slot in self._slots)

    def __repr__(self):
        return (f"BlockSwapper({len(self.swapped_block_indices)} of {len(self.model.blocks)} blocks in "
                f"{self.pinned_mode} host memory ({self.pinned_bytes() / 2**30:.2f} GiB), ring of {self.ring_size} "
                f"slots of {self.slot_bytes / 2**20:.0f} MiB on {self.device}, prefetch {self.settings.prefetch_blocks}"
                f"{', removed' if self.removed else ''})")

    # --- undo ----------------------------------------------------------------------------------

    def release_slots(self):
        """Free the device slot ring while the model steps aside (between forwards; the swapped blocks
        stay in host memory). allocate_slots() makes it again before the next forward."""
        if self.removed or not self._slots:
            return
        self._streams.synchronize()  # no queued copy may still write a slot
        self._drop_slots()
        self._next_slot = 0

    def allocate_slots(self):
        """Make the slot ring again after release_slots() (nothing to do while it exists)."""
        if not self.removed and not self._slots:
            self._allocate_slots()

    def _drop_hooks_and_slots(self):
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._drop_slots()

    def _drop_slots(self):
        self._slot_views.clear()
        self._slots.clear()
        self._slot_owner.clear()
        self._slot_running.clear()
        self._slot_ready.clear()
        self._slot_free.clear()
        self._block_slot.clear()
        self._embedding_device_bytes.clear()

    def _restore_all(self, device):
        """Every packed tensor gets its own storage on `device`; the host buffers are freed."""
        for packed in self._all_packed():
            packed.restore_to(device)
            packed.release()
        self._packed_blocks.clear()
        self._packed_embeddings.clear()

    def remove(self, restore_device=None):
        """Undo the swap. Every swapped or offloaded tensor becomes an ordinary tensor on
        `restore_device` (default: the compute device, so the model is as if loaded fully there; pass
        'cpu' when it does not fit); hooks, slots and host buffers are dropped. Calling it again does
        nothing."""
        if self.removed:
            return
        restore_device = self.device if restore_device is None else torch.device(restore_device)
        self._streams.synchronize()  # no copy may still read a host buffer or write a slot
        if restore_device.type == "cuda":
            needed = self.pinned_bytes()
            slot_bytes = sum(slot.numel() for slot in self._slots) if restore_device == self.device else 0
            available = free_bytes(restore_device) + slot_bytes
            if needed > available:
                raise MemoryError(f"Restoring the {len(self.swapped_block_indices)} swapped blocks needs "
                                  f"{needed / 2**30:.2f} GiB on {restore_device}, but only {available / 2**30:.2f} GiB "
                                  "are free. Call remove(restore_device='cpu') to keep them in CPU memory.")
        self._drop_hooks_and_slots()
        try:
            self._restore_all(restore_device)
        except torch.OutOfMemoryError as error:
            self._restore_all("cpu")  # the rest, so that nothing is left pointing at freed buffers
            raise MemoryError(f"Out of memory on {restore_device} while restoring swapped blocks; those not yet "
                              "restored are in CPU memory. Call remove(restore_device='cpu') next time.") from error
        finally:
            self.removed = True
            if getattr(self.model, _SWAPPER_ATTRIBUTE, None) is not None:
                delattr(self.model, _SWAPPER_ATTRIBUTE)
        logger.info("Block swap removed; swapped tensors restored to %s.", restore_device)

    def _roll_back(self):
        """After a failed enable: the whole model in CPU memory, nothing left on the device."""
        self._streams.synchronize()
        self._drop_hooks_and_slots()
        self._restore_all(torch.device("cpu"))
        with torch.no_grad():
            for tensor in _module_tensors(self.model):
                if tensor.device.type != "cpu":
                    tensor.data = tensor.data.cpu()
        self.removed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def get_block_swapper(model):
    """The active BlockSwapper of `model`, or None."""
    reference = getattr(model, _SWAPPER_ATTRIBUTE, None)
    swapper = reference() if reference is not None else None
    return swapper if swapper is not None and not swapper.removed else None


def enable_block_swap(model, device, settings):
    """Keep the first `settings.blocks_to_swap` blocks of `model` in pinned CPU memory and stream them
    to `device` as they run; everything else moves to `device`. Returns the BlockSwapper.

    Enable it last: after loading, LoRA merging and quantization (it packs the weights as they are).
    The model may be on the CPU (the usual case for a model larger than the GPU) or on `device`.
    On failure the model is left entirely in CPU memory and nothing stays on the device.
    """
    if not isinstance(settings, BlockSwapSettings):
        raise TypeError(f"settings must be a BlockSwapSettings; got {type(settings).__name__}.")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList; block swap needs a WanModel.")
    settings.validate(len(blocks))
    if get_block_swapper(model) is not None:
        raise RuntimeError("Block swap is already enabled on this model; call remove() on its BlockSwapper "
                           "(get_block_swapper(model)) before enabling it again.")
    if any(t.is_meta for t in _module_tensors(model)):
        raise ValueError("The model has tensors on the meta device (not loaded); load the weights before "
                         "enabling block swap.")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    swapper = BlockSwapper(model, device, BlockSwapSettings(**vars(settings)))
    if 0 < swapper.ring_size and len(swapper.swapped_block_indices) <= swapper.ring_size:
        logger.warning("Swapping %d blocks with a ring of %d slots keeps them all on the device: it saves no "
                       "memory. Swap more than %d blocks, or none.", len(swapper.swapped_block_indices),
                       swapper.ring_size, swapper.ring_size)
    embedding_names = swapper._offloaded_embedding_names()
    swapper._check_device_memory(embedding_names)  # before anything moves
    try:
        swapper._place(embedding_names)
    except BaseException as error:
        swapper._roll_back()
        if isinstance(error, torch.OutOfMemoryError):
            raise MemoryError(f"Out of memory on {device} while enabling block swap of "
                              f"{settings.blocks_to_swap} blocks; the model was left in CPU memory. Swap more "
                              f"blocks (up to {len(blocks)}), or use fp8 quantization.") from error
        raise
    setattr(model, _SWAPPER_ATTRIBUTE, weakref.ref(swapper))
    logger.info("%r", swapper)
    return swapper
