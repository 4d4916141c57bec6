"""Write a header-only (sparse) Wan 2.1 safetensors file of a real size, for planning and CLI demos:
the header has every official key and shape; the data region is a hole that takes no disk space.

    python benchmarks/header_only_checkpoint.py 14B /tmp/wan2.1_t2v_14B_bf16.safetensors
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: `python benchmarks/header_only_checkpoint.py` finds wanvideo
from wanvideo.tiny import make_header_only_checkpoint  # noqa: E402

SIZES = {"1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
         "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)}


def write(size, path, model_type="t2v"):
    config = dict(SIZES[size], model_type=model_type, in_dim=16 if model_type == "t2v" else 36)
    return make_header_only_checkpoint(path, config, prefix="model.diffusion_model.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=list(SIZES))
    parser.add_argument("path", help="the .safetensors file to write")
    parser.add_argument("model_type", nargs="?", default="t2v", choices=("t2v", "i2v", "flf2v"))
    args = parser.parse_args()
    print(write(args.size, args.path, args.model_type))
