"""Check the distributed strategy on this machine: every layout against the plain model.

    python -m wanvideo.parallel.distributed.selfcheck                    # all visible GPUs, tiny model
    python -m wanvideo.parallel.distributed.selfcheck --devices cpu cpu cpu cpu --precision fp32
    python -m wanvideo.parallel.distributed.selfcheck --shard-weights on    # weights sharded (FSDP2)

For each layout cfg x ulysses x ring of the device count, one guided forward of a tiny random Wan
model (6 heads; an odd token count, so sequence padding is exercised) runs on the worker group and
is compared with the plain model in this process. Also checks the fused attention kernels that
return a log-sum-exp (ring attention) against the exact float32 path on the first device.
Prints one line per check; exits 1 if any relative error is above the tolerance of the precision.
"""
import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

from ...checkpoint import load_wan_model
from ...devices import parse_devices
from ...sampling.loop import Conditioning
from ...tiny import make_tiny_checkpoint
from .attention import attention_with_lse
from .topology import ParallelDegrees
from .workers import DistributedWanRunner

TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 5e-3}


def all_layouts(world_size):
    """Every ParallelDegrees with product world_size."""
    layouts = []
    for cfg in (1, 2):
        if world_size % cfg:
            continue
        sequence = world_size // cfg
        layouts += [ParallelDegrees(cfg, u, sequence // u) for u in range(1, sequence + 1) if sequence % u == 0]
    return layouts


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def check_attention_kernels(device, dtype):
    """[(name, relative error)] of the fused log-sum-exp kernels against the float32 math path."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 64, generator=g).to(device, dtype) for n in (77, 123, 123))
    results = []
    for name, mask in (("no mask", None), ("ragged mask", torch.arange(123)[None] < torch.tensor([[123], [50]]))):
        mask = None if mask is None else mask.to(device)
        fused_out, fused_lse = attention_with_lse(q, k, v, mask, fused=True)
        exact_out, exact_lse = attention_with_lse(q.float(), k.float(), v.float(), mask, fused=False)
        results.append((f"attention+lse {name} {dtype}", max(relative_error(fused_out, exact_out),
                                                               relative_error(fused_lse, exact_lse))))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="*", help="devices or GPU ids (cpu cpu, 0 1, cuda:0 cuda:1); "
                                                         "default: every visible GPU")
    parser.add_argument("--precision", default="fp32", choices=sorted(TOLERANCE))
    parser.add_argument("--shard-weights", default="off", choices=("off", "on"),
                        help="on: each worker holds 1/N of the weights (FSDP2), gathering each block as it runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    devices = parse_devices(args.devices) if args.devices else \
        [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if not devices:
        parser.error("no GPU is visible; name devices, e.g. --devices cpu cpu")
    tolerance, failures = TOLERANCE[args.precision], 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def report(name, error):
        nonlocal failures
        ok = error <= tolerance
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {error:.2e} (tolerance {tolerance:.0e})", flush=True)

    for name, error in check_attention_kernels(devices[0], dtype):
        report(name, error)
    with tempfile.TemporaryDirectory() as folder:
        path, _, _ = make_tiny_checkpoint(Path(folder) / "wan_tiny_t2v.safetensors", "t2v", dim=96, num_heads=6)
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(1, 16, 3, 6, 10, generator=g), torch.tensor([700.0])
        positive = Conditioning([torch.randn(7, 32, generator=g)])
        negative = Conditioning([torch.randn(5, 32, generator=g)])
        model = load_wan_model(path, devices[0], args.precision)
        with torch.no_grad():
            run = lambda c: torch.stack(model(list(x.to(devices[0])), t.to(devices[0]), [u.to(devices[0]) for u in c]))
            cond, uncond = run(positive.context), run(negative.context)
            expected = (uncond + 4.0 * (cond - uncond)).cpu()
        del model
        with DistributedWanRunner(path, devices, base_precision=args.precision,
                                  shard_weights=args.shard_weights) as runner:
            sharded = ", weights sharded" if args.shard_weights == "on" else ""
            for degrees in all_layouts(len(devices)):
                out = runner.forward(x, t, positive, negative, cfg=4.0, degrees=degrees)
                report(f"{len(devices)} x {devices[0].type} {degrees}{sharded}", relative_error(out, expected))
    print("all checks passed" if not failures else f"{failures} checks FAILED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
