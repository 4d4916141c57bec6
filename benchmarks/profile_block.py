"""Where a block's time goes: CUDA kernel table of one Wan block (ours) at a real size.

    python benchmarks/profile_block.py [--size 1.3B] [--resolution 480p]
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_model, from any working directory
from bench_model import LATENT_FRAMES, RESOLUTIONS, build_ours  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--size", default="1.3B")
parser.add_argument("--resolution", default="480p")
args = parser.parse_args()
h, w = RESOLUTIONS[args.resolution]
model = build_ours(args.size, layers=1)
x = [torch.randn(16, LATENT_FRAMES, h, w, device="cuda")]
with torch.inference_mode():
    tok, ctx, e, grid = model.embed(x, torch.tensor([500.0], device="cuda"), [torch.randn(512, 4096, device="cuda")])
    block = model.blocks[0]
    for _ in range(3):
        block(tok, ctx)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            block(tok, ctx)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
