"""The planner on injected GPU inventories and real-size checkpoint headers (sparse files, no data)."""
import json
import math

import pytest
import torch

from wanvideo import inspect_checkpoint
from wanvideo.checkpoint import build_meta_model
from wanvideo.modules.model import WanModel
from wanvideo.parallel import plan
from wanvideo.tiny import make_header_only_checkpoint
from wanvideo.parallel.distributed.topology import choose_degrees
from wanvideo.parallel.plan import (GIB, PLAN_KEYS, ModelFootprint, estimate_block_distribution_bytes,
                                    estimate_single_gpu_bytes, latent_token_count, plan_parallelism, usable_memory)

SIZES = {
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def write_header_only_checkpoint(path, model_type="t2v", **size):
    """A safetensors file with the official keys and shapes of a real Wan 2.1 model whose data is a
    hole (sparse file): the header is real, the 28 GB of a 14B take no disk space."""
    config = dict(model_type=model_type, in_dim=16 if model_type == "t2v" else 36, text_dim=4096, freq_dim=256,
                  out_dim=16, **size)
    return make_header_only_checkpoint(path, config)


@pytest.fixture(scope="module")
def real_size(tmp_path_factory):
    folder = tmp_path_factory.mktemp("headers")
    return {name: inspect_checkpoint(str(write_header_only_checkpoint(folder / f"wan_{name}.safetensors", **size)))
            for name, size in SIZES.items()}


def inventory(*sizes_gib, in_use_gib=0.5, peers=True):
    """GPUs of these sizes (GiB), each with `in_use_gib` taken by the desktop / CUDA context."""
    gpus = [dict(index=i, name=f"GPU{i}", total_memory=int(s * GIB), free_memory=int((s - in_use_gib) * GIB))
            for i, s in enumerate(sizes_gib)]
    for gpu in gpus:
        gpu["peers"] = [g["index"] for g in gpus if g is not gpu] if peers else []
    return gpus


def meta_bytes(module, bytes_per_element=2):
    return sum(p.numel() for p in module.parameters()) * bytes_per_element


def assert_fits(config, gpus):
    by_index = {g["index"]: g for g in gpus}
    assert len(config["estimated_memory_per_gpu"]) == len(config["gpu_ids"])
    for gpu_id, estimate in zip(config["gpu_ids"], config["estimated_memory_per_gpu"]):
        assert estimate <= usable_memory(by_index[gpu_id]), (gpu_id, estimate / GIB, config["reason"])


# --- building blocks -----------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,frames", [(64, 48, 9), (96, 80, 17), (112, 64, 1)])
def test_token_count_matches_the_patch_embedding(width, height, frames):
    """tokens = ((frames-1)//4+1) * (h//16) * (w//16): checked against the model's own embedding of
    latents of the Wan VAE's shape (4x in time with the first frame kept, 8x in space)."""
    from wanvideo.tiny import tiny_config
    model = WanModel(**tiny_config())
    latents = torch.zeros(16, (frames - 1) // 4 + 1, height // 8, width // 8)
    tokens, *_ = model.embed([latents], torch.tensor([1.0]), [torch.zeros(3, 32)])
    assert latent_token_count(width, height, frames) == tokens.shape[1]


def test_real_size_headers_read_as_the_released_models(real_size):
    assert real_size["14B"].size_name == "14B" and real_size["14B"].num_layers == 40
    assert real_size["1.3B"].size_name == "1.3B" and real_size["1.3B"].config["num_heads"] == 12
    assert real_size["14B"].config["num_heads"] == 40


@pytest.mark.parametrize("size", ["1.3B", "14B"])
@pytest.mark.parametrize("quantization", ["disabled", "fp8_e4m3fn"])
def test_footprint_counts_the_parameters_of_the_architecture(real_size, size, quantization):
    """Block, embedding and head bytes agree with a count over the meta-device model."""
    footprint = ModelFootprint(real_size[size], "bf16", quantization)
    model = build_meta_model(real_size[size].config)
    block = model.blocks[0]
    linear_elements = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    other_elements = sum(p.numel() for p in block.parameters()) - linear_elements
    linear_bytes = 1 if quantization != "disabled" else 2
    assert footprint.block_bytes == linear_elements * linear_bytes + other_elements * 2
    assert footprint.head_bytes == meta_bytes(model.head)
    outside = meta_bytes(model) - sum(meta_bytes(b) for b in model.blocks)
    assert footprint.embedding_bytes + footprint.head_bytes == outside


def test_activation_estimate_scales_with_items_tokens_and_shards(real_size):
    footprint = ModelFootprint(real_size["14B"])
    one = footprint.activation_bytes(32760, 1)
    assert footprint.activation_bytes(32760, 2) == 2 * one
    assert footprint.activation_bytes(65520, 1) > 1.9 * one
    quarter = footprint.activation_bytes(32760, 1, sequence_shards=4)
    assert one / 4 < quarter < one / 2  # a quarter of the tokens plus the exchange buffers
    # Not absurd: more than the residual stream and the FFN hidden layer of one item, less than 10x that.
    floor = 32760 * (5120 + 13824) * 2
    assert floor < one < 10 * floor


# Measured on an H100 (bf16, random weights, one forward, PyTorch 2.11 SDPA): bytes above the weights,
# live peak (max_memory_allocated) and reserved by the caching allocator (max_memory_reserved).
MEASURED_ACTIVATIONS = [  # size, width, height, frames, items, live GiB, reserved GiB
    ("1.3B", 832, 480, 81, 1, 1.52, 2.03), ("1.3B", 832, 480, 81, 2, 2.96, 3.79),
    ("1.3B", 1280, 720, 81, 2, 6.82, 8.41), ("14B", 832, 480, 81, 1, 2.96, 4.38),
    ("14B", 832, 480, 81, 2, 5.90, 8.56), ("14B", 1280, 720, 81, 1, 6.82, 9.76),
    ("14B", 1280, 720, 81, 2, 13.60, 18.68),
]


@pytest.mark.parametrize("size,width,height,frames,items,live,reserved", MEASURED_ACTIVATIONS)
def test_activation_estimate_covers_the_measured_forward(real_size, size, width, height, frames, items, live,
                                                         reserved):
    estimate = ModelFootprint(real_size[size]).activation_bytes(latent_token_count(width, height, frames), items)
    assert reserved * GIB <= estimate <= 1.25 * reserved * GIB
    assert estimate <= 1.6 * live * GIB  # conservative, not absurd


@pytest.mark.parametrize("world,heads,expected", [(8, 40, (8, 1)), (4, 40, (4, 1)), (8, 12, (4, 2)),
                                                  (3, 40, (1, 3)), (6, 12, (6, 1)), (5, 12, (1, 5))])
def test_ulysses_degree_divides_the_heads_and_ring_takes_the_rest(world, heads, expected):
    degrees = choose_degrees(world, heads, use_cfg=False)   # what the planner's workers run without CFG groups
    ulysses, ring = degrees.ulysses, degrees.ring
    assert (ulysses, ring) == expected
    assert ulysses * ring == world and heads % ulysses == 0


def test_ti2v_5b_tokens_and_activations_use_the_wan22_vae(tmp_path):
    """Issue 12 item 5: the 5B's Wan 2.2 VAE packs 16x16 pixels (48 channels): 1280x704, 121 frames is
    31 x 22 x 40 = 27,280 tokens (the Wan 2.1 VAE's 8x would make it 4x as many), and the plan's
    activations and reason use that count and the model's name."""
    config = dict(model_type="ti2v", in_dim=48, out_dim=48, text_dim=4096, freq_dim=256, dim=3072, ffn_dim=14336,
                  num_heads=24, num_layers=30)
    info = inspect_checkpoint(str(make_header_only_checkpoint(tmp_path / "wan2.2_ti2v_5B_fp16.safetensors", config)))
    assert info.vae_stride == (4, 16, 16) and info.latent_channels == 48
    assert latent_token_count(1280, 704, 121, vae_stride=info.vae_stride) == 27280
    assert latent_token_count(1280, 704, 121) == 4 * 27280  # what the Wan 2.1 stride would have said
    footprint = ModelFootprint(info)
    assert footprint.description == "Wan 2.2 TI2V 5B"
    assert footprint.head_bytes == (3072 * 4 * 48 + 4 * 48 + 2 * 3072) * 2   # the 48-channel head
    gpus = inventory(80)
    plan_ = plan_parallelism(info, gpus, width=1280, height=704, num_frames=121)
    assert plan_["parallelism_type"] == "none"
    activations = footprint.activation_bytes(27280, 2)
    assert plan_["estimated_memory_per_gpu"] == [estimate_single_gpu_bytes(footprint, activations)]
    assert "Wan 2.2 TI2V 5B in bf16" in plan_["reason"] and "27280 tokens (1280x704, 121 frames)" in plan_["reason"]


# --- the documented scenarios ----------------------------------------------------------------------

def test_14b_bf16_runs_on_one_80gb_gpu_without_swap(real_size):
    gpus = inventory(80)
    config = plan_parallelism(real_size["14B"], gpus)
    assert config["parallelism_type"] == "none" and config["gpu_ids"] == [0]
    assert config["blocks_to_swap"] == 0 and config["blocks_per_gpu"] is None
    assert_fits(config, gpus)
    footprint = ModelFootprint(real_size["14B"])
    assert config["estimated_memory_per_gpu"][0] > footprint.weight_bytes  # weights plus activations
    assert set(config) == set(PLAN_KEYS)
    json.dumps(config)  # a plain dict the loader (and a workflow file) can hold


def test_14b_bf16_on_24gb_swaps_the_fewest_blocks_that_fit(real_size):
    gpus = inventory(24)
    config = plan_parallelism(real_size["14B"], gpus)
    swap = config["blocks_to_swap"]
    assert config["parallelism_type"] == "none" and 0 < swap < 40
    footprint = ModelFootprint(real_size["14B"])
    activation = footprint.activation_bytes(latent_token_count(832, 480, 81), 2)
    available = usable_memory(gpus[0])
    assert estimate_single_gpu_bytes(footprint, activation, swap) <= available
    assert estimate_single_gpu_bytes(footprint, activation, swap - 1) > available
    # Independently: the resident blocks, two blocks in flight and the rest fit; one more block would not.
    block = meta_bytes(build_meta_model(real_size["14B"].config).blocks[0])
    fixed = footprint.weight_bytes - 40 * block + activation + plan.RUNTIME_RESERVE_BYTES
    assert fixed + (40 - swap + 2) * block <= available < fixed + (40 - swap + 3) * block
    assert config["estimated_memory_per_gpu"] == [estimate_single_gpu_bytes(footprint, activation, swap)]
    assert "fp8" in config["reason"]


def test_two_24gb_gpus_split_14b_blocks_and_swap_less_than_one_gpu(real_size):
    gpus = inventory(24, 24)
    config = plan_parallelism(real_size["14B"], gpus, shard_weights="off")  # sharded: test_distributed_sharding.py
    assert config["parallelism_type"] == "block_distribution" and config["gpu_ids"] == [0, 1]
    assert sum(config["blocks_per_gpu"]) == 40 and min(config["blocks_per_gpu"]) > 0
    assert_fits(config, gpus)
    single = plan_parallelism(real_size["14B"], gpus[:1])
    assert config["blocks_to_swap"] < single["blocks_to_swap"]
    assert config["blocks_to_swap"] == sum(config["blocks_to_swap_per_gpu"] or [0])
    footprint = ModelFootprint(real_size["14B"])
    activation = footprint.activation_bytes(latent_token_count(832, 480, 81), 2)
    assert config["estimated_memory_per_gpu"] == estimate_block_distribution_bytes(
        footprint, activation, config["blocks_per_gpu"], config["blocks_to_swap_per_gpu"])


def test_two_24gb_gpus_run_1_3b_in_parallel(real_size):
    gpus = inventory(24, 24)
    with_cfg = plan_parallelism(real_size["1.3B"], gpus)
    assert with_cfg["parallelism_type"] == "data_parallel" and with_cfg["gpu_ids"] == [0, 1]
    assert_fits(with_cfg, gpus)
    without_cfg = plan_parallelism(real_size["1.3B"], gpus, cfg=False)  # one item: split the tokens instead
    assert without_cfg["parallelism_type"] == "distributed"
    assert (without_cfg["ulysses_degree"], without_cfg["ring_degree"], without_cfg["cfg_degree"]) == (2, 1, 1)
    assert_fits(without_cfg, gpus)


def test_uneven_gpus_get_blocks_in_proportion_to_their_free_memory(real_size):
    gpus = inventory(24, 12)
    workload = dict(width=832, height=480, num_frames=17, cfg=False)  # a short clip: both GPUs can help
    config = plan_parallelism(real_size["14B"], gpus, **workload)
    assert config["parallelism_type"] == "block_distribution" and config["blocks_to_swap"] == 0
    blocks = config["blocks_per_gpu"]
    assert sum(blocks) == 40 and blocks[0] > blocks[1] > 0
    assert_fits(config, gpus)
    footprint = ModelFootprint(real_size["14B"])
    activation = footprint.activation_bytes(latent_token_count(832, 480, 17), 1)
    capacity = [usable_memory(gpus[0]) - activation - plan.RUNTIME_RESERVE_BYTES - footprint.embedding_bytes,
                usable_memory(gpus[1]) - activation - plan.RUNTIME_RESERVE_BYTES - footprint.head_bytes]
    for count, share in zip(blocks, capacity):
        assert abs(count - 40 * share / sum(capacity)) <= 1


@pytest.mark.parametrize("small_gib", [10, 12])
def test_a_gpu_that_holds_too_little_is_left_out(real_size, small_gib):
    """480p, 81 frames with CFG: 8.8 GiB of activations leave a 10 GB GPU no block, and a 12 GB GPU
    one block (0.7 GB), less than the 2 x 0.67 GB of activations its hop would move each step."""
    gpus = inventory(24, small_gib)
    config = plan_parallelism(real_size["14B"], gpus)
    assert config["gpu_ids"] == [0] and config["blocks_to_swap"] > 0
    assert "GPU 1 cannot take part" in config["reason"]
    assert_fits(config, gpus)


def test_four_16gb_gpus(real_size):
    gpus = inventory(16, 16, 16, 16)
    assert plan_parallelism(real_size["14B"], gpus)["shard_weights"] == "on"  # distributed, 1/4 of the weights each
    bf16 = plan_parallelism(real_size["14B"], gpus, shard_weights="off")
    assert bf16["parallelism_type"] == "block_distribution" and bf16["blocks_to_swap"] > 0
    assert sum(bf16["blocks_per_gpu"]) == 40
    assert_fits(bf16, gpus)
    fp8 = plan_parallelism(real_size["14B"], gpus, quantization="fp8_e4m3fn", shard_weights="off")
    assert fp8["parallelism_type"] == "block_distribution" and fp8["blocks_to_swap"] == 0
    assert fp8["quantization"] == "fp8_e4m3fn"
    assert_fits(fp8, gpus)
    small = plan_parallelism(real_size["1.3B"], gpus)  # 2 items on 4 GPUs: CFG groups x 2-way Ulysses
    assert small["parallelism_type"] == "distributed"
    assert (small["cfg_degree"], small["ulysses_degree"], small["ring_degree"]) == (2, 2, 1)
    assert_fits(small, gpus)


def test_eight_80gb_gpus_run_14b_distributed(real_size):
    gpus = inventory(*[80] * 8)
    config = plan_parallelism(real_size["14B"], gpus)
    assert config["parallelism_type"] == "distributed" and config["gpu_ids"] == list(range(8))
    degrees = config["cfg_degree"] * config["ulysses_degree"] * config["ring_degree"]
    assert degrees == 8 and 40 % config["ulysses_degree"] == 0
    assert (config["cfg_degree"], config["ulysses_degree"]) == (2, 4)
    assert_fits(config, gpus)
    no_cfg = plan_parallelism(real_size["14B"], gpus, cfg=False)
    assert (no_cfg["cfg_degree"], no_cfg["ulysses_degree"], no_cfg["ring_degree"]) == (1, 8, 1)
    small = plan_parallelism(real_size["1.3B"], gpus, cfg=False)  # 12 heads: Ulysses 4, ring 2
    assert (small["ulysses_degree"], small["ring_degree"]) == (4, 2)
    assert "ring attention" in small["reason"]


def test_eight_gpus_with_eight_items_use_data_parallel(real_size):
    config = plan_parallelism(real_size["14B"], inventory(*[80] * 8), batch_size=4)
    assert config["parallelism_type"] == "data_parallel" and len(config["gpu_ids"]) == 8


def test_too_few_tokens_to_split_keep_one_gpu(real_size):
    config = plan_parallelism(real_size["1.3B"], inventory(24, 24), width=256, height=256, num_frames=17, cfg=False)
    assert config["parallelism_type"] == "none" and len(config["gpu_ids"]) == 1
    assert "too few to split" in config["reason"]


def test_sequence_parallel_uses_only_as_many_gpus_as_the_tokens_justify(real_size):
    # 512x512, 33 frames = 9 * 32 * 32 = 9216 tokens: 4 shards of at least 2048 tokens, not 8.
    config = plan_parallelism(real_size["1.3B"], inventory(*[80] * 8), width=512, height=512, num_frames=33, cfg=False)
    assert config["parallelism_type"] == "distributed"
    assert config["ulysses_degree"] * config["ring_degree"] == 4 and len(config["gpu_ids"]) == 4
    assert "idle" in config["reason"]


def test_gpus_without_peer_access_are_named_in_the_reason(real_size):
    # one item: no data parallel to fall back to, so sequence parallel still, with the link named
    config = plan_parallelism(real_size["14B"], inventory(*[80] * 8, peers=False), cfg=False)
    assert config["parallelism_type"] == "distributed" and "host memory" in config["reason"]
    assert "without peer access" in config["reason"]


def linked(gpus, kind, generation=4):
    """Set the links of an inventory: 'host' (PCIe without peer access), 'p2p' or 'nvlink' (H100-class)."""
    for gpu in gpus:
        others = [g["index"] for g in gpus if g is not gpu]
        gpu.update(pcie_generation=generation, pcie_width=16, compute_capability=(9, 0),
                   peers=[] if kind == "host" else others, nvlink_peers=others if kind == "nvlink" else [])
    return gpus


def test_pcie_without_peer_access_prefers_cfg_parallel_over_ulysses(real_size):
    """Issue 13 item 3: 14B, 832x480, 33 frames with CFG on 4 GPUs. Over NVLink, CFG groups x Ulysses 2
    on all 4 (about 0.64 s per step by the estimate); over PCIe Gen4 through host memory the all-to-alls
    (5.8 GB per GPU and step at about 13 GB/s) eat the gain, so the branches go side by side on 2 GPUs."""
    workload = dict(num_frames=33)
    nvlink = plan_parallelism(real_size["14B"], linked(inventory(*[80] * 4), "nvlink"), **workload)
    assert nvlink["parallelism_type"] == "distributed" and len(nvlink["gpu_ids"]) == 4
    assert (nvlink["cfg_degree"], nvlink["ulysses_degree"]) == (2, 2)
    assert "Link assumed: NVLink (about 450 GB/s per direction)" in nvlink["reason"]
    host = plan_parallelism(real_size["14B"], linked(inventory(*[80] * 4), "host"), **workload)
    assert host["parallelism_type"] == "data_parallel" and len(host["gpu_ids"]) == 2
    assert "CFG parallel" in host["reason"] and "Sequence parallelism on 4 GPUs was not chosen" in host["reason"]
    assert "PCIe Gen4 x16 without peer access, through host memory (about 13 GB/s" in host["reason"]


def test_two_pcie_host_cards_with_cfg_run_the_branches_side_by_side(real_size):
    """Two cards without peer access, cfg > 1: each branch on its own card (CFG parallel in one
    process). The workers would run 2 GPUs with CFG as cfg 2 x ulysses 1 too (serving's layout), so
    no sequence-parallel layout of 2 GPUs is weighed (Ulysses x 2 with both branches is not what
    they run); without CFG the tokens are split and the reason names the link it weighed."""
    config = plan_parallelism(real_size["1.3B"], linked(inventory(24, 24), "host"))
    assert config["parallelism_type"] == "data_parallel" and config["gpu_ids"] == [0, 1]
    assert config["ulysses_degree"] == 1 and "CFG parallel" in config["reason"]
    assert "Sequence parallelism" not in config["reason"]
    no_cfg = plan_parallelism(real_size["1.3B"], linked(inventory(24, 24), "host"), cfg=False)
    assert "PCIe Gen4 x16 without peer access" in no_cfg["reason"]


def test_wide_sequence_parallelism_still_wins_where_compute_dominates(real_size):
    """81 frames of 14B on 8 GPUs through host memory: the estimate (1.05 s of compute + 0.80 s of
    exchange against 4.2 s for the two CFG branches side by side) keeps sequence parallel, and the
    reason states the link and the exchange."""
    config = plan_parallelism(real_size["14B"], linked(inventory(*[80] * 8), "host"))
    assert config["parallelism_type"] == "distributed" and len(config["gpu_ids"]) == 8
    assert "GB of exchange per GPU over PCIe Gen4 x16 without peer access" in config["reason"]
    assert "Link assumed: PCIe Gen4 x16 without peer access" in config["reason"]


def test_sharded_weights_gathered_over_a_slow_link_lose_to_block_distribution(real_size):
    """14B on two 24 GB cards, a short clip without CFG: little compute per step, so gathering 13 GiB
    of weights per forward over PCIe through host memory costs more than block distribution's turns;
    over NVLink the gather is cheap and sharding wins."""
    workload = dict(num_frames=17, cfg=False)
    host = plan_parallelism(real_size["14B"], linked(inventory(24, 24), "host"), **workload)
    assert host["parallelism_type"] == "block_distribution" and host["shard_weights"] == "off"
    assert "Sharding the weights over 2 GPUs (distributed) was not chosen" in host["reason"]
    assert "weight gather" in host["reason"] and "without peer access" in host["reason"]
    nvlink = plan_parallelism(real_size["14B"], linked(inventory(24, 24), "nvlink"), **workload)
    assert nvlink["parallelism_type"] == "distributed" and nvlink["shard_weights"] == "on"
    assert "Block distribution over 2 GPUs would take" in nvlink["reason"] and "NVLink" in nvlink["reason"]


def speeds(gpus, *values):
    for gpu, value in zip(gpus, values):
        gpu["relative_speed"] = value
    return gpus


def test_unlike_gpus_split_the_blocks_by_speed(real_size):
    """Issue 13 item 4: two 24 GB cards, the second half as fast: a 2:1 block split (27 + 13 of 40),
    where equal cards split 20 + 20."""
    workload = dict(num_frames=17, cfg=False, shard_weights="off")
    equal = plan_parallelism(real_size["14B"], inventory(24, 24), **workload)
    assert equal["parallelism_type"] == "block_distribution" and equal["blocks_per_gpu"] == [20, 20]
    mixed = plan_parallelism(real_size["14B"], speeds(inventory(24, 24), 1.0, 0.5), **workload)
    assert mixed["parallelism_type"] == "block_distribution" and mixed["blocks_per_gpu"] == [27, 13]
    assert "times its relative speed" in mixed["reason"]
    assert "Relative speeds (as given in the inventory): GPU 0 1.00, GPU 1 0.50" in mixed["reason"]
    slow_first = plan_parallelism(real_size["14B"], speeds(inventory(24, 24), 0.5, 1.0), **workload)
    assert slow_first["blocks_per_gpu"] == [13, 27]


def test_a_slow_gpu_that_would_hold_the_others_back_is_left_out(real_size):
    """Item shares and token shards are equal, so a group runs at its slowest member's pace: with
    1.0 and 0.4 the two CFG branches run faster both on the fast card than one on each; with 1.0
    and 0.8 side by side still wins; a 0.3 card among four stays out of the sequence shards."""
    slow = plan_parallelism(real_size["1.3B"], speeds(inventory(24, 24), 0.4, 1.0))
    assert slow["parallelism_type"] == "none" and slow["gpu_ids"] == [1]
    assert "the slowest GPU sets the pace" in slow["reason"]
    close = plan_parallelism(real_size["1.3B"], speeds(inventory(24, 24), 1.0, 0.8))
    assert close["parallelism_type"] == "data_parallel" and close["gpu_ids"] == [0, 1]
    four = plan_parallelism(real_size["1.3B"], speeds(inventory(*[80] * 4), 1.0, 1.0, 1.0, 0.3), cfg=False)
    assert four["parallelism_type"] == "distributed" and four["gpu_ids"] == [0, 1, 2]
    assert four["ulysses_degree"] * four["ring_degree"] == 3


def test_speeds_are_measured_only_for_unlike_gpus(real_size, monkeypatch):
    """The planner asks wanvideo.gpus.speed (the real function): GPUs of one model are not timed;
    two models are, each GPU once, and the blocks follow the measured speeds."""
    from wanvideo.gpus import speed
    timed = []
    monkeypatch.setattr(speed, "local_gpu_indices", lambda: {"GPU-a": 0, "GPU-b": 1})
    monkeypatch.setattr(speed, "probe_tflops", lambda index: timed.append(index) or {0: 400.0, 1: 200.0}[index])
    workload = dict(num_frames=17, cfg=False, shard_weights="off")

    def gpus(*names):
        return [dict(g, name=name, uuid=uuid) for g, name, uuid in zip(inventory(24, 24), names, ("GPU-a", "GPU-b"))]
    same = plan_parallelism(real_size["14B"], gpus("RTX 4090", "RTX 4090"), **workload)
    assert timed == [] and same["blocks_per_gpu"] == [20, 20]
    mixed = plan_parallelism(real_size["14B"], gpus("RTX 4090", "RTX 3090"), **workload)
    assert sorted(timed) == [0, 1] and mixed["blocks_per_gpu"] == [27, 13]
    assert "measured with a bf16 matmul probe" in mixed["reason"]


def test_the_speed_probe_runs_before_the_free_memory_is_read(real_size, monkeypatch, tmp_path):
    """get_optimal_gpu_config (and validate_model_setup) reading the inventory itself: unlike GPUs are
    timed first (the probe leaves a CUDA context and, until emptied, cached blocks), then the free
    memory is read for the plan; the planner does not probe again."""
    from wanvideo.gpus import discovery, speed
    from wanvideo.parallel import auto
    events = []
    gpus = [dict(g, name=name, uuid=uuid) for g, name, uuid in
            zip(inventory(24, 24), ("RTX 4090", "RTX 3090"), ("GPU-a", "GPU-b"))]
    monkeypatch.setattr(discovery, "get_gpu_info", lambda: events.append("read") or [dict(g) for g in gpus])
    monkeypatch.setattr(speed, "local_gpu_indices", lambda: {"GPU-a": 0, "GPU-b": 1})
    monkeypatch.setattr(speed, "probe_tflops", lambda index: events.append("probe") or 400.0 / (index + 1))
    config = auto.get_optimal_gpu_config(real_size["14B"], num_frames=17, cfg=False, shard_weights="off")
    assert events == ["read", "probe", "probe", "read"]
    assert config["blocks_per_gpu"] == [27, 13]
    speed.clear_speed_cache()   # a new process, a new cache file: timed again
    monkeypatch.setenv("WANVIDEO_GPU_SPEED_CACHE", str(tmp_path / "again.json"))
    events.clear()
    # validate_model_setup reading the inventory itself: the chosen GPUs are timed, then read again
    ok, message = auto.validate_model_setup("0,1", real_size["14B"], num_frames=17, cfg=False, shard_weights="off")
    assert ok and events == ["read", "probe", "probe", "read"], message


def test_a_sharded_step_gathers_the_weights_for_each_forward(real_size):
    """With CFG on and one CFG group (cfg_degree 1) each GPU runs cond, then uncond: FSDP gathers the
    weights for each, twice a step; with two CFG groups (or no CFG) once."""
    from wanvideo.parallel.plan_cost import StepCosts
    footprint = ModelFootprint(real_size["14B"])
    gpus = linked(inventory(24, 24), "host")
    gathered = footprint.weight_bytes * (2 - 1) / 2
    with_cfg = StepCosts(footprint, plan.Workload(footprint, 832, 480, 17, True, 1), {0: 1.0, 1: 1.0})
    one_group = with_cfg.sharded(gpus, 1, 2, 1)
    assert one_group.traffic_bytes == pytest.approx(2 * gathered + with_cfg.sequence_exchange_bytes(1, 2, 1))
    assert with_cfg.sharded(gpus, 2, 1, 1).traffic_bytes == pytest.approx(gathered)
    without_cfg = StepCosts(footprint, plan.Workload(footprint, 832, 480, 17, False, 1), {0: 1.0, 1: 1.0})
    assert without_cfg.sharded(gpus, 1, 2, 1).traffic_bytes == pytest.approx(
        gathered + without_cfg.sequence_exchange_bytes(1, 2, 1))


def test_traffic_is_printed_in_gb_and_hops_as_a_total():
    """The links are in GB/s, so traffic is printed in GB (10**9 bytes); activation hops are the total
    over the stage boundaries, not per GPU."""
    from wanvideo.gpus.links import Link
    from wanvideo.parallel.plan_cost import Estimate
    link = Link("pcie_p2p", 25.0, "PCIe Gen4 x16 with peer access")
    hops = Estimate(1.0, 0.5, 0.5, 2.5e9, link, "activation hops", per_gpu=False)
    assert "2.5 GB of activation hops in all over PCIe" in hops.text() and "per GPU" not in hops.text()
    assert "2.5 GB of exchange per GPU over" in Estimate(1.0, 0.5, 0.5, 2.5e9, link).text()


def test_block_distribution_is_estimated_as_the_loader_runs_it(real_size):
    """pipeline_branches (the loader's, default on) reaches the estimate: 14B on four 16 GB cards with
    peer access, 17 frames with CFG: pipelined, block distribution keeps every GPU busy and wins; with
    the stages in turn the sharded distributed plan is faster."""
    gpus = lambda: linked(inventory(16, 16, 16, 16), "p2p")
    pipelined = plan_parallelism(real_size["14B"], gpus(), num_frames=17)
    assert pipelined["parallelism_type"] == "block_distribution"
    in_turn = plan_parallelism(real_size["14B"], gpus(), num_frames=17, pipeline_branches=False)
    assert in_turn["parallelism_type"] == "distributed" and in_turn["shard_weights"] == "on"
    blocks = plan_parallelism(real_size["14B"], gpus(), num_frames=17, pipeline_branches=False, shard_weights="off")
    assert "With pipeline_branches off the GPUs take the whole batch in turn" in blocks["reason"]


@pytest.mark.parametrize("cfg,batch_size", [(True, 1), (True, 3), (False, 1), (False, 2), (False, 3), (False, 4)])
@pytest.mark.parametrize("world", [2, 4, 6, 8])
def test_distributed_plans_use_the_layout_the_workers_choose(real_size, cfg, batch_size, world):
    """The workers (serving.WorkerSession.layout) use CFG groups when cfg != 1 or the batch splits in
    two (cfg_parallel.splits_in_two: 2n videos of one size); the plan's degrees must be theirs."""
    from wanvideo.parallel.distributed.cfg_parallel import splits_in_two
    from wanvideo.parallel.distributed.topology import choose_degrees
    latents = [torch.zeros(16, 21, 60, 104)] * batch_size
    for size, gib_each in (("1.3B", 80), ("14B", 16)):   # replicated, and sharded 14B on 16 GB cards
        config = plan_parallelism(real_size[size], inventory(*[gib_each] * world), cfg=cfg, batch_size=batch_size)
        if config["parallelism_type"] != "distributed":
            continue
        workers = choose_degrees(len(config["gpu_ids"]), real_size[size].config["num_heads"],
                                 use_cfg=cfg or splits_in_two(latents))
        assert (config["cfg_degree"], config["ulysses_degree"], config["ring_degree"]) == (
            workers.cfg, workers.ulysses, workers.ring), (size, config["reason"])


def test_the_refused_distributed_plan_is_named_as_it_was(real_size):
    """block swap asked: the sharded plan the planner would have chosen is named as sharded, not as
    sequence parallel."""
    gpus = lambda: linked(inventory(24, 24), "nvlink")
    assert plan_parallelism(real_size["14B"], gpus(), num_frames=17, cfg=False)["shard_weights"] == "on"
    config = plan_parallelism(real_size["14B"], gpus(), num_frames=17, cfg=False, block_swap=True)
    assert config["parallelism_type"] != "distributed"
    assert "The distributed strategy, with the weights sharded over 2 GPUs, would be faster" in config["reason"]
    assert "sequence parallel on" not in config["reason"]


def test_no_nccl_keeps_auto_in_process_and_says_why(real_size, monkeypatch):
    """Issue 13 item 4 (Windows): CUDA without NCCL: 'auto' does not pick distributed."""
    import torch.distributed
    assert plan_parallelism(real_size["1.3B"], inventory(*[80] * 8), cfg=False)["parallelism_type"] == "distributed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    config = plan_parallelism(real_size["1.3B"], inventory(*[80] * 8), cfg=False)
    assert config["parallelism_type"] != "distributed"
    assert "no NCCL" in config["reason"] and "data_parallel, block_distribution and expert_parallel" in config["reason"]


def test_distributed_refuses_gpus_without_nccl(monkeypatch):
    import torch.distributed
    from wanvideo.parallel.distributed.workers import _as_devices
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="NCCL.*data_parallel.*block_distribution.*expert_parallel"):
        _as_devices(["cuda:0", "cuda:1"])
    assert _as_devices(["cpu", "cpu"]) == [torch.device("cpu")] * 2   # gloo on CPU still works


def test_no_gpu_plans_for_the_cpu(real_size):
    config = plan_parallelism(real_size["14B"], [])
    assert config["parallelism_type"] == "none" and config["gpu_ids"] == []
    assert "CPU" in config["reason"] and config["estimated_memory_per_gpu"] == []


def test_too_large_even_with_every_block_swapped_says_so(real_size):
    config = plan_parallelism(real_size["14B"], inventory(8), width=1280, height=720)
    assert config["blocks_to_swap"] == 40 and "run out of memory" in config["reason"]


def test_bad_arguments_name_the_value(real_size):
    with pytest.raises(ValueError, match="width=0"):
        plan_parallelism(real_size["1.3B"], inventory(24), width=0)
    with pytest.raises(ValueError, match="fp64"):
        plan_parallelism(real_size["1.3B"], inventory(24), base_precision="fp64")
    with pytest.raises(ValueError, match="int4"):
        plan_parallelism(real_size["1.3B"], inventory(24), quantization="int4")
    with pytest.raises(ValueError, match="batch_size=0"):
        plan_parallelism(real_size["1.3B"], inventory(24), batch_size=0)
    with pytest.raises(ValueError, match="free_memory"):
        plan_parallelism(real_size["1.3B"], [dict(index=0, total_memory=GIB)])


def test_every_plan_fits_its_gpus_over_many_inventories(real_size):
    """Whatever the planner picks, its own estimates fit the GPUs it names, and blocks add up."""
    for size in SIZES:
        for gpus in (inventory(12), inventory(24, 12, 8), inventory(48, 48, 48), inventory(*[40] * 6),
                     inventory(16, 80)):
            for cfg in (True, False):
                config = plan_parallelism(real_size[size], gpus, cfg=cfg)
                if "run out of memory" not in config["reason"]:
                    assert_fits(config, gpus)
                if config["blocks_per_gpu"] is not None:
                    assert sum(config["blocks_per_gpu"]) == real_size[size].num_layers
                world = config["cfg_degree"] * config["ulysses_degree"] * config["ring_degree"]
                if config["parallelism_type"] == "distributed":
                    assert world == len(config["gpu_ids"]) >= 2
                assert math.isfinite(sum(config["estimated_memory_per_gpu"]))
