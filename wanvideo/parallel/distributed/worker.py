"""Worker entry point for torchrun: the same workers as DistributedWanRunner's, on one or many machines.

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank N --rdzv-backend c10d --rdzv-endpoint HOST0:29400 \\
        -m wanvideo.parallel.distributed.worker --checkpoint /models/wan2.1_t2v_14B_bf16.safetensors \\
        --serve-port 29510

Every rank joins the group through torchrun's environment (env://: RANK, WORLD_SIZE, MASTER_ADDR,
LOCAL_RANK), loads its own weights on cuda:LOCAL_RANK, and waits for requests. Rank 0 serves a
small TCPStore on --serve-host:--serve-port (on the rank-0 machine, MASTER_ADDR); the other ranks
and ComfyUI's process (TorchrunWanClient, wanvideo.parallel.distributed.remote) connect to it.

Keys of the store (n = 1, 2, ...; one client at a time):
    request/n      the Request as safetensors bytes (settings as JSON metadata)     client -> workers
    interrupt/n    present: stop at the next step                                     client -> workers
    progress/n     "step total" after each step                                       rank 0 -> client
    result/n       the result tensor as safetensors bytes                             rank 0 -> client
    interrupted/n  present: the run stopped on request                                rank 0 -> client
    model          the checkpoint's facts for the client's checks (ServedModel JSON)   rank 0 -> client
    ready          the world size, once every rank has loaded its weights              rank 0 -> client
    error          a worker's traceback (that rank exits; restart the torchrun job)   any rank -> client
The store has no authentication: serve on a private network only. Nothing in it is ever unpickled.
"""
import argparse
import logging
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ...modules.attention import BACKENDS as ATTENTION_BACKENDS
from ...pipeline import LoadSettings
from .protocol import ServedModel, decode_request, encode_tensor
from .serving import RunInterrupted, WorkerSession

logger = logging.getLogger(__name__)

REQUEST_POLL_S = 0.2


def request_key(kind, n):
    return f"{kind}/{n}"


def serve(session, store, rank):
    """Answer requests from `store` until a 'shutdown' request; every rank runs this loop."""
    n = 0
    while True:
        n += 1
        while not store.check([request_key("request", n)]):  # idle without any collective: no timeouts
            time.sleep(REQUEST_POLL_S)
        request = decode_request(store.get(request_key("request", n)))
        if request.kind == "shutdown":
            logger.info("Rank %d: shutdown requested", rank)
            return

        def on_step(step, total, x0):
            if rank == 0:
                store.set(request_key("progress", n), f"{step + 1} {total}")

        # Only rank 0 reads the interrupt key; the ranks agree through an all-reduce every step.
        stop_requested = (lambda: store.check([request_key("interrupt", n)])) if rank == 0 else (lambda: False)
        try:
            result = session.run(request, stop_requested, on_step)
        except RunInterrupted:
            if rank == 0:
                store.set(request_key("interrupted", n), "1")
            continue
        if rank == 0:
            store.set(request_key("result", n), encode_tensor(result))
            store.delete_key(request_key("request", n))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="Wan 2.1 .safetensors file (the same path on every machine)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--quantization", default="disabled", choices=("disabled", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_fast"))
    parser.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS,
                        help="attention backend (default sdpa); auto: per attention shape, the faster of sdpa and "
                             "sage_triton, timed on the first call")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, for trying it out")
    parser.add_argument("--shard-weights", default="off", choices=("off", "on"),
                        help="on: each rank holds 1/N of the weights and gathers each block as it runs (FSDP2)")
    parser.add_argument("--serve-host", default="0.0.0.0", help="address rank 0's request store listens on")
    parser.add_argument("--serve-port", type=int, default=29510, help="port of rank 0's request store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[wan worker %(process)d] %(levelname)s %(name)s: %(message)s")

    if "RANK" not in os.environ:
        parser.error("run me under torchrun (RANK, WORLD_SIZE, MASTER_ADDR are not set).")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    phases, lap = {}, time.monotonic()  # start-up phases, as the spawned workers time them (workers.py)

    def end_phase(name):
        nonlocal lap
        phases[name], lap = time.monotonic() - lap, time.monotonic()

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # the context now, so its phase says what it costs
    end_phase("cuda_init")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            timeout=timedelta(minutes=30))  # NCCL connects lazily, at the first collective
    end_phase("process_group")
    store = dist.TCPStore(args.serve_host if rank == 0 else os.environ["MASTER_ADDR"], args.serve_port,
                          is_master=rank == 0, wait_for_workers=False, timeout=timedelta(minutes=10))
    exit_code = 0
    try:
        session = WorkerSession(args.checkpoint, device, LoadSettings(base_precision=args.precision,
                                                                      quantization=args.quantization,
                                                                      attention_mode=args.attention),
                                shard_weights=args.shard_weights == "on")
        end_phase("weights")
        dist.barrier()
        end_phase("barrier")  # the slowest peer; NCCL connects here (its first collective)
        if rank == 0:
            logger.info("Start-up: %s", ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items()))
            store.set("model", ServedModel.from_info(session.info).to_json())
            store.set("ready", str(dist.get_world_size()))
            logger.info("Serving Wan requests on %s:%d with %d ranks", args.serve_host, args.serve_port,
                        dist.get_world_size())
        serve(session, store, rank)
        dist.barrier()  # rank 0 keeps the store up until every rank has read the shutdown request
    except BaseException:  # noqa: BLE001 - reported to the client, then the process exits
        message = f"rank {rank}:\n{traceback.format_exc()}"
        logger.error(message)
        try:
            store.set("error", message)
        except Exception:  # noqa: BLE001 - the store itself may be gone
            pass
        exit_code = 1
    finally:
        dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
