"""GPU check: the model in fp32, bf16 and fp16 on CUDA (a real-size 1.3B block at 480p and a whole
tiny-model forward), each against fp32 on the same card. Run: python benchmarks/gpu_check_precisions.py"""
import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: `python benchmarks/gpu_check_precisions.py` finds wanvideo
from bench_model import LATENT_FRAMES, RESOLUTIONS, build_ours  # noqa: E402
from wanvideo.checkpoint import load_wan_model  # noqa: E402
from wanvideo.tiny import make_tiny_checkpoint  # noqa: E402

argparse.ArgumentParser(description=__doc__).parse_args()  # --help, before any CUDA work


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


path = make_tiny_checkpoint("/tmp/tiny_precisions.safetensors", "i2v")[0]
g = torch.Generator().manual_seed(0)
x, y = [torch.randn(16, 5, 8, 10, generator=g)], [torch.randn(20, 5, 8, 10, generator=g)]
clip, ctx, t = torch.randn(1, 257, 1280, generator=g), [torch.randn(7, 32, generator=g)], torch.tensor([700.0])
with torch.inference_mode():
    reference = load_wan_model(path, "cuda", "fp32")(x, t, ctx, clip_fea=clip, y=y)[0]
    for precision in ("bf16", "fp16"):
        out = load_wan_model(path, "cuda", precision)(x, t, ctx, clip_fea=clip, y=y)[0]
        print(f"tiny i2v forward {precision} vs fp32 on CUDA: rel err {rel_err(out, reference):.2e}, finite {bool(out.isfinite().all())}")
    model = build_ours("1.3B", dtype=torch.float32, layers=1)
    h, w = RESOLUTIONS["480p"]
    tokens, block_ctx, _, _ = model.embed([torch.randn(16, LATENT_FRAMES, h, w, device="cuda")],
                                          torch.tensor([500.0], device="cuda"), [torch.randn(512, 4096, device="cuda")])
    reference = model.blocks[0](tokens, block_ctx)
    for dtype in (torch.bfloat16, torch.float16):
        block = model.blocks[0].to(dtype)
        out = block(tokens.to(dtype), replace(block_ctx, context=block_ctx.context.to(dtype)))
        print(f"1.3B block 480p {str(dtype)[6:]} vs fp32 on CUDA: rel err {rel_err(out, reference):.2e}, "
              f"finite {bool(out.isfinite().all())}")
        block.float()
