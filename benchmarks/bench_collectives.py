"""The Ulysses all-to-alls of one denoising step, timed alone over the real link (NCCL, 2+ GPUs).

Sequence parallelism over N GPUs sends, per block, q, k and v packed in one all-to-all ([3, L/N,
heads, 128] per rank) and the attention output back in another ([L/N, heads, 128]); this times
exactly those two calls, for every block of a step, at a case's real sizes. Against the rank's
compute (benchmarks/projection.py) it says how much of a distributed step the exchange takes, and
what bandwidth the link really gives at these message sizes (the projection assumes one).

    python benchmarks/bench_collectives.py                    # 14B and 1.3B at 480p and 720p, every GPU
    python benchmarks/bench_collectives.py --dry-run          # 2 CPU processes over gloo, tiny sizes
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python benchmarks/X.py`
from projection import SIZES  # noqa: E402
from wanvideo.parallel.distributed.workers import free_port  # noqa: E402

# name: (model size in projection.SIZES, video tokens: at 81 frames 21 latent frames x (height / 16) x (width / 16))
CASES = {"14B_480p": ("14B", 32760), "14B_720p": ("14B", 75600), "1.3B_480p": ("1.3B", 32760),
         "1.3B_720p": ("1.3B", 75600), "tiny": ("tiny", 64)}


def _rank(rank, world, port, cases, iters, dry_run, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu") if dry_run else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if dry_run else "nccl", rank=rank, world_size=world)
    rows = []
    for name in cases:
        size, tokens = CASES[name]
        dim, blocks = SIZES[size]["dim"], SIZES[size]["num_layers"]
        local = -(-tokens // world)  # the last shard is padded to the same length
        packed = torch.randn(3 * local * dim, device=device, dtype=torch.bfloat16)
        out = torch.randn(local * dim, device=device, dtype=torch.bfloat16)
        recv_packed, recv_out = torch.empty_like(packed), torch.empty_like(out)

        def block():
            dist.all_to_all_single(recv_packed, packed)
            dist.all_to_all_single(recv_out, out)

        for _ in range(3):
            block()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        began = time.perf_counter()
        for _ in range(iters):
            block()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_block = (time.perf_counter() - began) / iters
        sent = (packed.numel() + out.numel()) * 2 * (world - 1) / world  # bytes leaving this rank per block
        rows.append(dict(case=name, gpus=world, tokens_per_rank=local, block_ms=per_block * 1e3,
                         step_s=per_block * blocks, GB_per_step=sent * blocks / 1e9,
                         effective_GBps=sent / per_block / 1e9))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="14B_480p,14B_720p,1.3B_480p,1.3B_720p")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="2 CPU processes over gloo, tiny sizes")
    args = parser.parse_args()
    cases = ["tiny"] if args.dry_run else args.cases.split(",")
    world = 2 if args.dry_run else torch.cuda.device_count()
    if world < 2:
        sys.exit("bench_collectives.py needs 2 or more GPUs (or --dry-run).")
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank, args=(r, world, port, cases, args.iters, args.dry_run, queue))
                 for r in range(world)]
    for p in processes:
        p.start()
    rows = queue.get(timeout=600)
    for p in processes:
        p.join()
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "collectives.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0) if not args.dry_run else "cpu", torch=torch.__version__,
                       rows=rows), f, indent=1)
    print(f"{'case':<10} {'GPUs':>4} {'ms/block':>9} {'s/step':>8} {'GB/step':>8} {'GB/s':>7}")
    for r in rows:
        print(f"{r['case']:<10} {r['gpus']:>4} {r['block_ms']:>9.2f} {r['step_s']:>8.3f} {r['GB_per_step']:>8.2f} "
              f"{r['effective_GBps']:>7.1f}")


if __name__ == "__main__":
    main()
