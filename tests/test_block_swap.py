"""Block swap (wanvideo/engine/block_swap.py) against the plain resident model.

On CPU the swapper runs its whole logic (packing, slot ring, prefetch order, hooks) with synchronous
copies; the CUDA tests at the end (streams, events, pinned memory) run where a GPU is present.
"""
import contextlib
import gc
import logging
import weakref

import pytest
import torch

from conftest import relative_error
from wanvideo.checkpoint import load_wan_model
from wanvideo.engine.block_swap import (ALIGNMENT, BlockSwapSettings, _consume_stale_cuda_error, enable_block_swap,
                                      get_block_swapper)

NUM_BLOCKS = 4  # the tiny model's
TIMESTEPS = (900.0, 500.0, 100.0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def load(checkpoints, model_type="t2v", quantization="disabled", device="cpu", precision="fp32"):
    path = checkpoints[model_type][0]
    return load_wan_model(str(path), device=device, base_precision=precision, quantization=quantization)


def make_inputs(model_type, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(x=[torch.randn(16, 3, 4, 6, generator=generator).to(device)],
                  context=[torch.randn(9, 32, generator=generator).to(device)])
    if model_type != "t2v":
        inputs["clip_fea"] = torch.randn(1, 257, 1280, generator=generator).to(device)
        inputs["y"] = [torch.randn(20, 3, 4, 6, generator=generator).to(device)]
    return inputs


def denoise(model, inputs, steps=TIMESTEPS):
    """One forward per timestep, as a sampler does; returns the outputs [16, F, H, W]."""
    with torch.no_grad():
        return [model(t=torch.tensor([t], device=inputs["x"][0].device), **inputs)[0] for t in steps]


def storages(module):
    """Data pointers of the storages behind a module's tensors."""
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def tensor_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def has_hooks(module):
    return bool(module._forward_pre_hooks) or bool(module._forward_hooks)


# --- which blocks, and where they live ---------------------------------------------------------


@pytest.mark.parametrize("blocks_to_swap", [0, 1, 3, NUM_BLOCKS])
def test_swaps_exactly_the_first_n_blocks(tiny_checkpoints, blocks_to_swap):
    model = load(tiny_checkpoints)
    total = tensor_bytes(model)
    block_bytes = [tensor_bytes(b) for b in model.blocks]
    swapper = enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=blocks_to_swap))

    assert swapper.swapped_block_indices == list(range(blocks_to_swap))
    resident_storages = set().union(*(storages(b) for b in model.blocks[blocks_to_swap:]))
    for index, block in enumerate(model.blocks):
        swapped = index < blocks_to_swap
        assert has_hooks(block) == swapped
        if swapped:  # one packed buffer per block, shared with no other block or resident tensor
            assert len(storages(block)) == 1
            assert not storages(block) & resident_storages
            assert all(storages(block) != storages(other) for other in model.blocks[:index])
    assert swapper.ring_size == min(2, blocks_to_swap)
    swapped_bytes = sum(block_bytes[:blocks_to_swap])
    padding = ALIGNMENT * sum(len(list(b.parameters())) + len(list(b.buffers())) for b in model.blocks[:blocks_to_swap])
    assert swapped_bytes <= swapper.pinned_bytes() <= swapped_bytes + padding
    assert swapper.slot_bytes >= max(block_bytes[:blocks_to_swap], default=0)
    assert swapper.resident_bytes() == total - swapped_bytes + swapper.ring_size * swapper.slot_bytes


def test_settings_are_checked(tiny_checkpoints):
    model = load(tiny_checkpoints)
    before = storages(model)
    with pytest.raises(ValueError, match=r"blocks_to_swap=5 .* 4 blocks.* 0 to 4"):
        enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=5))
    assert storages(model) == before and not any(has_hooks(b) for b in model.blocks)
    with pytest.raises(ValueError, match="blocks_to_swap must be 0 or more; got -1"):
        BlockSwapSettings(blocks_to_swap=-1)
    with pytest.raises(ValueError, match="prefetch_blocks must be 0 or more; got -2"):
        BlockSwapSettings(blocks_to_swap=1, prefetch_blocks=-2)
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match="blocks_to_swap must be a whole number"):
            BlockSwapSettings(blocks_to_swap=bad)
    with pytest.raises(TypeError, match="offload_txt_emb must be True or False"):
        BlockSwapSettings(offload_txt_emb=1)
    with pytest.raises(TypeError, match="BlockSwapSettings"):
        enable_block_swap(model, "cpu", {"blocks_to_swap": 2})
    swapper = enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=3))
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=1))
    assert get_block_swapper(model) is swapper


def test_unloaded_model_is_refused(tiny_checkpoints):
    from wanvideo.checkpoint import build_meta_model, inspect_checkpoint
    model = build_meta_model(inspect_checkpoint(str(tiny_checkpoints["t2v"][0])).config)
    with pytest.raises(ValueError, match="meta device"):
        enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=2))


# --- upload order and the ring -----------------------------------------------------------------


@pytest.mark.parametrize("blocks_to_swap, prefetch_blocks, expected_log, on_demand", [
    # each block's upload is issued by the post-hook of the block before it; the last swapped block
    # prefetches the first for the next step, so only the very first upload is on demand
    (3, 1, [0, 1, 2, 0, 1, 2, 0], 1),
    (4, 2, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1], 1),
    # no prefetch: every block is uploaded by its own pre-hook, evicting the oldest slot
    (3, 0, [0, 1, 2, 0, 1, 2], 6),
    # as many blocks as slots: uploaded once, then they stay
    (2, 1, [0, 1], 1),
])
def test_upload_order_over_two_steps(tiny_checkpoints, blocks_to_swap, prefetch_blocks, expected_log, on_demand):
    model = load(tiny_checkpoints)
    swapper = enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap, prefetch_blocks))
    denoise(model, make_inputs("t2v"), steps=TIMESTEPS[:2])
    assert list(swapper.upload_log) == expected_log
    assert swapper.on_demand_uploads == on_demand


def test_swapping_no_more_blocks_than_slots_warns(tiny_checkpoints, caplog):
    with caplog.at_level(logging.WARNING, logger="wanvideo.engine.block_swap"):
        enable_block_swap(load(tiny_checkpoints), "cpu", BlockSwapSettings(blocks_to_swap=2, prefetch_blocks=1))
    assert "saves no memory" in caplog.text


def test_slots_are_allocated_once_and_reused(tiny_checkpoints):
    model = load(tiny_checkpoints)
    swapper = enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=3, prefetch_blocks=1))
    home = {i: storages(model.blocks[i]) for i in swapper.swapped_block_indices}
    seen_per_step = []

    def record(module, args):  # registered after the swapper's pre-hook: sees the block as it runs
        seen_per_step[-1].append(storages(module))

    for i in swapper.swapped_block_indices:
        model.blocks[i].register_forward_pre_hook(record)
    for t in TIMESTEPS:
        seen_per_step.append([])
        denoise(model, make_inputs("t2v"), steps=[t])
        for i in swapper.swapped_block_indices:  # between forwards every block is back in host memory
            assert storages(model.blocks[i]) == home[i]
    slots_per_step = [set().union(*step) for step in seen_per_step]
    for step in seen_per_step:
        for i, running in enumerate(step):
            assert len(running) == 1 and running != home[i]  # the whole block in one slot, not at home
    assert len(slots_per_step[0]) == swapper.ring_size == 2
    assert slots_per_step[0] == slots_per_step[1] == slots_per_step[2]  # the same two buffers every step


# --- same function as the resident model --------------------------------------------------------


@pytest.mark.parametrize("model_type, quantization, settings", [
    ("t2v", "disabled", BlockSwapSettings(blocks_to_swap=3, prefetch_blocks=1, offload_txt_emb=True)),
    ("t2v", "disabled", BlockSwapSettings(blocks_to_swap=NUM_BLOCKS, prefetch_blocks=0)),
    ("i2v", "disabled", BlockSwapSettings(blocks_to_swap=3, prefetch_blocks=2, offload_txt_emb=True,
                                          offload_img_emb=True)),
    ("t2v", "fp8_e4m3fn", BlockSwapSettings(blocks_to_swap=3, offload_txt_emb=True)),
    ("i2v", "fp8_e4m3fn", BlockSwapSettings(blocks_to_swap=NUM_BLOCKS, prefetch_blocks=2, offload_img_emb=True)),
])
def test_swapped_model_matches_resident_model(tiny_checkpoints, model_type, quantization, settings):
    resident = load(tiny_checkpoints, model_type, quantization)
    model = load(tiny_checkpoints, model_type, quantization)
    swapper = enable_block_swap(model, "cpu", settings)
    if quantization != "disabled":  # fp8 weights and fp32 scale buffers share the block's one buffer
        linear = model.blocks[0].self_attn.q
        assert linear.weight.dtype == torch.float8_e4m3fn and linear.scale_weight.dtype == torch.float32
        assert linear.weight.untyped_storage().data_ptr() == linear.scale_weight.untyped_storage().data_ptr()
    inputs = make_inputs(model_type)
    for swapped, expected in zip(denoise(model, inputs), denoise(resident, inputs)):
        assert relative_error(swapped, expected) <= 1e-5
        assert torch.equal(swapped, expected)  # the same bytes go through the same kernels
    assert swapper.on_demand_uploads >= 1


def test_offloaded_embeddings_are_uploaded_only_while_they_run(tiny_checkpoints):
    model = load(tiny_checkpoints, "i2v")
    swapper = enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=0, offload_txt_emb=True,
                                                                offload_img_emb=True))
    assert swapper.swapped_block_indices == [] and swapper.ring_size == 0
    homes = {name: storages(getattr(model, name)) for name in ("text_embedding", "img_emb")}
    assert all(len(home) == 1 for home in homes.values())
    assert swapper.pinned_bytes() >= tensor_bytes(model.text_embedding) + tensor_bytes(model.img_emb)
    seen = {}
    for name in homes:
        getattr(model, name).register_forward_pre_hook(
            lambda module, args, name=name: seen.update({name: storages(module)}))
    denoise(model, make_inputs("i2v"), steps=[500.0])
    for name, home in homes.items():
        assert len(seen[name]) == 1 and seen[name] != home  # a device copy while running
        assert storages(getattr(model, name)) == home       # back home afterwards
    assert not any(has_hooks(b) for b in model.blocks)


def test_any_block_order_works(tiny_checkpoints):
    """A runner that runs blocks in another order than the prefetch expects still gets the right weights."""
    def backwards(blocks, tokens, ctx):
        for block in reversed(blocks):
            tokens = block(tokens, ctx)
        return tokens

    resident, model = load(tiny_checkpoints), load(tiny_checkpoints)
    resident.block_runner = model.block_runner = backwards
    swapper = enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=3, prefetch_blocks=1))
    inputs = make_inputs("t2v")
    for swapped, expected in zip(denoise(model, inputs), denoise(resident, inputs)):
        assert torch.equal(swapped, expected)
    assert swapper.on_demand_uploads > 1  # the prefetches guessed wrong, and the pre-hooks corrected them


# --- undo --------------------------------------------------------------------------------------


def test_remove_restores_the_model_and_frees_everything(tiny_checkpoints):
    resident, model = load(tiny_checkpoints, "i2v"), load(tiny_checkpoints, "i2v")
    swapper = enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=3, offload_txt_emb=True,
                                                                offload_img_emb=True))
    inputs = make_inputs("i2v")
    denoise(model, inputs, steps=TIMESTEPS[:1])
    host_buffers = [weakref.ref(p.host.tensor) for p in swapper._all_packed()]
    slots = [weakref.ref(slot) for slot in swapper._slots]
    hooked = [model.text_embedding, model.img_emb, *model.blocks]

    swapper.remove()
    swapper.remove()  # a second call does nothing
    gc.collect()
    assert not any(has_hooks(m) for m in hooked)
    assert all(ref() is None for ref in host_buffers + slots)
    assert get_block_swapper(model) is None
    for block in model.blocks:  # ordinary tensors again, each with its own storage
        assert len(storages(block)) == len(list(block.parameters())) + len(list(block.buffers()))
    for restored, expected in zip(denoise(model, inputs), denoise(resident, inputs)):
        assert torch.equal(restored, expected)
    enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=1))  # and it can be swapped again


def test_swapper_dies_with_its_model(tiny_checkpoints):
    model = load(tiny_checkpoints)
    swapper = enable_block_swap(model, "cpu", BlockSwapSettings(blocks_to_swap=3))
    denoise(model, make_inputs("t2v"), steps=TIMESTEPS[:1])
    swapper_ref = weakref.ref(swapper)
    del swapper, model
    gc.collect()
    assert swapper_ref() is None


# --- CUDA: pinned memory, copy stream, events ---------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("prefetch_blocks", [0, 1, 2])
def test_cuda_swap_matches_resident(tiny_checkpoints, prefetch_blocks):
    resident = load(tiny_checkpoints, "i2v", device="cuda", precision="bf16")
    model = load(tiny_checkpoints, "i2v", device="cpu", precision="bf16")
    swapper = enable_block_swap(model, "cuda", BlockSwapSettings(blocks_to_swap=3, prefetch_blocks=prefetch_blocks,
                                                                 offload_txt_emb=True, offload_img_emb=True))
    assert swapper.pinned_mode == "registered"  # page-locked at the exact size (is_pinned() cannot tell)
    assert all(t.device.type == "cpu" for i in range(3) for t in model.blocks[i].parameters())
    assert all(t.is_cuda for t in model.blocks[3].parameters()) and model.head.head.weight.is_cuda
    inputs = make_inputs("i2v", device="cuda")
    for swapped, expected in zip(denoise(model, inputs), denoise(resident, inputs)):
        assert torch.equal(swapped, expected)


@needs_cuda
@pytest.mark.parametrize("compute_stall, copy_stall", [(4_000_000, 1_000_000), (1_000_000, 4_000_000)])
def test_cuda_streams_are_ordered_by_events(tiny_checkpoints, monkeypatch, compute_stall, copy_stall):
    """Stall the compute stream before every block and the copy stream before every upload (GPU clock
    cycles). A slow compute stream catches uploads that overwrite a slot still to be read (a missing
    wait on the slot's free event: `copy_waits`); a slow copy stream catches blocks that read a slot
    before its upload finished (a missing wait on the ready event: `compute_waits`). Either changes
    the output. (Whether a run with the wait dropped does corrupt the output is a race, so it is not
    asserted: on an H200 it did in 2 runs of 5.)"""
    inputs = make_inputs("t2v", device="cuda")
    expected = denoise(load(tiny_checkpoints, "t2v", device="cuda", precision="bf16"), inputs)  # compiles too

    def swapped_outputs():
        model = load(tiny_checkpoints, "t2v", device="cpu", precision="bf16")
        swapper = enable_block_swap(model, "cuda", BlockSwapSettings(blocks_to_swap=4, prefetch_blocks=1))
        for block in model.blocks:
            block.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(compute_stall))
        copying = swapper._streams.copying

        @contextlib.contextmanager
        def slow_copying():
            with copying():
                torch.cuda._sleep(copy_stall)  # queued on the copy stream, ahead of the copy
                yield

        monkeypatch.setattr(swapper._streams, "copying", slow_copying)
        outputs = denoise(model, inputs)
        torch.cuda.synchronize()
        return outputs

    assert all(torch.equal(swapped, reference) for swapped, reference in zip(swapped_outputs(), expected))


@needs_cuda
def test_cuda_failed_registration_leaves_no_stale_error():
    """A failed cudaHostRegister leaves its error pending; the fallback must consume it, or the next
    PyTorch kernel launch would raise it as its own."""
    buffer = torch.empty(1 << 20, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) == 0
    try:
        assert int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) != 0  # already registered
        _consume_stale_cuda_error(torch.device("cuda"))
        assert torch.ones(4, device="cuda").add_(1).sum().item() == 8
    finally:
        assert int(cudart.cudaHostUnregister(buffer.data_ptr())) == 0


@needs_cuda
def test_cuda_remove_frees_device_and_pinned_memory(tiny_checkpoints):
    model = load(tiny_checkpoints, "t2v", device="cpu", precision="bf16")
    gc.collect()  # models of earlier tests (held in cycles by their hooks) release their memory now
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    swapper = enable_block_swap(model, "cuda", BlockSwapSettings(blocks_to_swap=3))
    rounding = 512 * (len(list(model.parameters())) + len(list(model.buffers())))  # the allocator's granule
    resident_tensors = tensor_bytes(model) - sum(tensor_bytes(model.blocks[i]) for i in range(3))
    assert 0 <= torch.cuda.memory_allocated() - baseline - swapper.resident_bytes() <= rounding
    denoise(model, make_inputs("t2v", device="cuda"), steps=TIMESTEPS[:2])
    swapper.remove(restore_device="cpu")
    gc.collect()
    assert all(t.device.type == "cpu" for i in range(3) for t in model.blocks[i].parameters())
    assert 0 <= torch.cuda.memory_allocated() - baseline - resident_tensors <= rounding  # the slots are gone
