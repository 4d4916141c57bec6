"""Less traffic (issue 13, item 2): the bytes the collectives send per forward, counted through
wrappers inside two gloo ranks; one upload per swapped block and step in pipelined block
distribution (counted from the swapper's upload log).

Ulysses packs q, k and v into one all-to-all (two per block: q/k/v there, the output back), and
sequence parallelism gathers the head's output (out_dim * prod(patch) numbers per token) instead of
the hidden states (dim per token).
"""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from conftest import counted_collectives, free_port, relative_error
from wanvideo.checkpoint import load_wan_model
from wanvideo.tiny import make_tiny_checkpoint

CPU = torch.device("cpu")
GRID = (3, 6, 10)            # latent frames, height, width: 3 x 3 x 5 = 45 tokens (odd: the second shard is padded)
TOKENS = 45
DIM, HEADS = 96, 6
def _rank(rank, world_size, port, path, out_folder):
    from wanvideo.parallel.distributed import ParallelDegrees
    from wanvideo.parallel.distributed.sequence_parallel import apply_sequence_parallel
    from wanvideo.parallel.distributed.topology import ParallelGroups
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    groups = ParallelGroups(ParallelDegrees(1, 2, 1))
    plain, model = load_wan_model(path, CPU, "fp32"), load_wan_model(path, CPU, "fp32")
    apply_sequence_parallel(model, groups)
    g = torch.Generator().manual_seed(0)
    x, context = [torch.randn(16, *GRID, generator=g)], [torch.randn(7, 32, generator=g)]
    per_token_t = torch.full((1, TOKENS), 700.0)
    per_token_t[:, :15] = 0.0  # Wan 2.2 TI2V: the first frame's tokens clean
    results = {}
    for name, t in (("t", torch.tensor([600.0])), ("per_token_t", per_token_t)):
        with torch.no_grad(), counted_collectives() as log:
            out = model(x, t, context)[0]
        with torch.no_grad():
            expected = plain(x, t, context)[0]
        results[name] = dict(log=log, error=relative_error(out, expected))
    with open(os.path.join(out_folder, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_traffic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("traffic")
    path, config, _ = make_tiny_checkpoint(folder / "t2v.safetensors", "t2v", dim=DIM, num_heads=HEADS)
    torch_mp.start_processes(_rank, args=(2, free_port(), str(path), str(folder)), nprocs=2, start_method="fork")
    return config, [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("timesteps", ["t", "per_token_t"])
def test_collective_bytes_per_forward(two_rank_traffic, timesteps):
    config, ranks = two_rank_traffic
    layers, out_numbers = config["num_layers"], config["out_dim"] * 4   # patch (1, 2, 2)
    shard = -(-TOKENS // 2)
    for results in ranks:
        result = results[timesteps]
        assert result["error"] <= 1e-5
        log = result["log"]
        to_all = [entry for entry in log if entry[0] == "all_to_all_single"]
        # one all-to-all for q, k and v packed, one for the attention output: 2 per block, not 4
        assert len(to_all) == 2 * layers, log
        packed = [entry for entry in to_all if entry[1][1] == 3]      # [dest, q/k/v, B, Ls, h, D]
        assert len(packed) == layers
        assert all(entry[2] == 3 * shard * DIM * 4 for entry in packed)   # fp32 q, k, v of the shard
        gathers = [entry for entry in log if entry[0] == "all_gather"]
        # the key mask (the second shard is padded) once, then the head's output once
        assert [entry[1] for entry in gathers] == [[1, shard], [1, shard, out_numbers]], gathers
        assert gathers[-1][2] == shard * out_numbers * 4               # 64 numbers per token, not dim
        assert {entry[0] for entry in log} == {"all_to_all_single", "all_gather"}


# --- cfg 1 with a batch of two: the CFG groups share the batch (the expert pair's cond + uncond) ----

def _halves_rank(rank, world_size, port, path, out_folder):
    from wanvideo.parallel.distributed.protocol import Request
    from wanvideo.parallel.distributed.serving import WorkerSession
    from wanvideo.pipeline import LoadSettings
    from wanvideo.sampling import Conditioning
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    plain = load_wan_model(path, CPU, "fp32")
    session = WorkerSession(path, CPU, LoadSettings(base_precision="fp32"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, *GRID, generator=g)                                # two videos of one size
    context = [torch.randn(7, 32, generator=g), torch.randn(4, 32, generator=g)]
    t = torch.tensor([600.0, 600.0])
    batches, forward = [], session.model.forward
    session.model.forward = lambda x, *args, **kwargs: batches.append(len(x)) or forward(x, *args, **kwargs)
    with torch.no_grad(), counted_collectives() as log:  # a worker's 'forward' request at cfg 1 (the expert pair's)
        out = session.run(Request("forward", latents=x, timestep=t, positive=Conditioning(context), cfg=1.0),
                          lambda: False)
    with torch.no_grad():
        expected = plain(list(x), t, context)
    result = dict(degrees=str(session._applied), batches=batches, log=log,
                  errors=[relative_error(o, e) for o, e in zip(out, expected)])
    with open(os.path.join(out_folder, f"halves{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_cfg1_batch_of_two_is_shared_by_the_cfg_groups(tmp_path):
    """A worker's 'forward' request at cfg 1 with two videos of one size: the layout is CFG 2 (no
    all-to-all), each rank's model runs one video, and one gather of the outputs gives both on every
    rank, equal to the plain model. (Besides that gather, only the per-request stop check.)"""
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v", dim=DIM, num_heads=HEADS)
    torch_mp.start_processes(_halves_rank, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2,
                             start_method="fork")
    for rank in range(2):
        result = json.loads((tmp_path / f"halves{rank}.json").read_text())
        assert result["degrees"] == "cfg 2 x ulysses 1 x ring 1"
        assert result["batches"] == [1]
        gathers = [entry for entry in result["log"] if entry[0] != "all_reduce"]
        assert [entry[0] for entry in gathers] == ["all_gather"], result["log"]
        assert gathers[0][2] == 16 * GRID[0] * GRID[1] * GRID[2] * 4     # one video's fp32 velocity
        assert max(result["errors"]) <= 1e-5


# --- pipelined block distribution with block swap: one upload per swapped block and step --------

def test_pipelined_stage_with_swap_uploads_each_block_once_per_step(tmp_path):
    from wanvideo.engine import BlockSwapSettings
    from wanvideo.parallel.block_distribution import distribute_model_blocks
    path, _, _ = make_tiny_checkpoint(tmp_path / "t2v.safetensors", "t2v")
    reference = load_wan_model(str(path), CPU, "fp32")
    model = load_wan_model(str(path), CPU, "fp32")
    distribution = distribute_model_blocks(model, [CPU, CPU], blocks_per_device=[3, 1], pipeline=True,
                                           blocks_to_swap_per_device=[3, 0],
                                           swap_settings=BlockSwapSettings(blocks_to_swap=3, prefetch_blocks=1))
    swapper = distribution.swappers[0]
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 3, 4, 6, generator=g) for _ in range(2)]                  # cond and uncond: 2 micro-batches
    context = [torch.randn(9, 32, generator=g), torch.randn(5, 32, generator=g)]
    steps = (900.0, 500.0)
    with torch.no_grad():
        for t in steps:
            outs = model(x, torch.tensor([t, t]), context)
            expected = reference(x, torch.tensor([t, t]), context)
            assert all(relative_error(o, e) <= 1e-5 for o, e in zip(outs, expected))
    # 3 swapped blocks, 2 steps: 6 uploads (+ the prefetch of block 0 for a third step), not 2 per block and step
    assert list(swapper.upload_log) == [0, 1, 2, 0, 1, 2, 0]
