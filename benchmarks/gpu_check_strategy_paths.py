"""GPU check: the fp8 fast path stays on after block swap and in data-parallel replicas, and a distributed
world of one gives the plain video (tiny model). Run: python benchmarks/gpu_check_strategy_paths.py"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: `python benchmarks/gpu_check_strategy_paths.py` finds wanvideo
from wanvideo.tiny import make_tiny_checkpoint  # noqa: E402
from wanvideo.pipeline import LoadSettings, load_pipeline  # noqa: E402
from wanvideo.parallel import load_parallel_pipeline  # noqa: E402
from wanvideo.engine import BlockSwapSettings  # noqa: E402
from wanvideo.engine import fp8_fast_active  # noqa: E402
from wanvideo.sampling import Conditioning, make_noise  # noqa: E402

argparse.ArgumentParser(description=__doc__).parse_args()  # --help, before any CUDA work
path = make_tiny_checkpoint("/tmp/tiny.safetensors", "t2v", dim=128, num_heads=4, ffn_dim=256)[0]
noise = make_noise((1, 16, 3, 8, 8), 0)
pos, neg = Conditioning([torch.randn(5, 32)]), Conditioning([torch.randn(3, 32)])
outs = {}
for name, build in [
    ("bf16", lambda: load_pipeline(path, "cuda", LoadSettings())),
    ("fast", lambda: load_pipeline(path, "cuda", LoadSettings(quantization="fp8_e4m3fn_fast"))),
    ("fast+swap", lambda: load_pipeline(path, "cuda", LoadSettings(quantization="fp8_e4m3fn_fast", block_swap=BlockSwapSettings(blocks_to_swap=3)))),
    ("fast+dp", lambda: load_parallel_pipeline(path, "data_parallel", settings=LoadSettings(quantization="fp8_e4m3fn_fast", block_swap=BlockSwapSettings(blocks_to_swap=3)), devices=["cuda:0", "cuda:0"])),
    ("distributed", lambda: load_parallel_pipeline(path, "distributed", settings=LoadSettings(), devices=["cuda:0"])),
]:
    p = build()
    model = p.model.replicas[0] if hasattr(p.model, "replicas") else p.model
    out = p.generate(noise, pos, neg, steps=3, cfg=4.0, progress=False)
    outs[name] = out
    err = ((out - outs["bf16"]).norm() / outs["bf16"].norm()).item()
    print(name, "fp8 fast active:", model is not None and fp8_fast_active(model), "rel err vs bf16: %.4f" % err, p.describe().splitlines()[-1])
    p.unload()
print("allocated after unloads (MiB):", torch.cuda.memory_allocated() / 2**20)
