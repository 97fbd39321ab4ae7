"""`zimage-lora serve`: the Ray Serve application on a local Ray instance (or a running cluster)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

DRAIN_TIMEOUT_S = 60.0  # SIGINT/SIGTERM: how long requests in flight may take to finish
SUMMARY = "serve generation with per-request adapters (Ray Serve)"

HELP = """Serve text-to-image with per-request adapters over HTTP (Ray Serve: the [serve] extra).

  GET  /health     200 "ok" once the model is loaded
  POST /generate   {"prompt": ..., "negative_prompt": null, "seed": 0, "steps": 9, "width": 1024,
                    "height": 1024, "guidance": 0,
                    "loras": [{"source": "style.safetensors", "strength": 0.8}]}  ->  image/png
  POST /v1/images/generations   OpenAI-shaped: {"prompt", "n", "size": "1024x1024", "loras": [...]}
  GET  /stats, GET /metrics     counters (JSON), Prometheus text

Everything Ray starts listens on 127.0.0.1 (only HTTP on --host). With --api-key-file (one key a
line) or $ZIMAGE_LORA_API_KEYS (comma-separated), every route but /health needs
'Authorization: Bearer KEY'. SIGINT/SIGTERM finish the requests in flight, then exit 0.

Concurrent requests are batched together whatever their adapters (each sample its own). Adapter
sources are read only from the --lora-root folders (and, with --allow-hub, from Hugging Face ids).

examples:
  zimage-lora serve --model ./Z-Image-Turbo --lora-root ./loras
  zimage-lora serve --model ./Z-Image-Turbo --lora-root ./loras --replicas 2 --max-batch-size 8 --port 8000
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..tools.generate import DTYPES, QUANTIZE

    p = sub.add_parser("serve", help=SUMMARY, description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pipeline folder or hub id (in the local cache)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model replicas (one GPU each when CUDA is visible)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--lora-root", action="append", default=[], metavar="DIR",
                   help="folder requests may read adapters from; repeat for several")
    p.add_argument("--allow-hub", action="store_true", help="also accept Hugging Face ids 'org/name'")
    p.add_argument("--host-budget-mb", type=int, default=8192, help="adapter cache in host memory (MiB)")
    p.add_argument("--device-budget-mb", type=int, default=4096, help="adapters attached on the device (MiB)")
    p.add_argument("--address", help="a running Ray cluster (default: start a local instance)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--quantize", choices=QUANTIZE, help="torchao weight-only quantization of the transformer")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests one replica holds (queued + running); more answer 503 with Retry-After")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="accepted API keys, one a line (also $ZIMAGE_LORA_API_KEYS, comma-separated)")
    p.add_argument("--dashboard", action="store_true", help="also start Ray's dashboard (on 127.0.0.1)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidFormatError
    from ..serving.auth import load_key_hashes
    from ..serving.core import ServeOptions
    from ..serving.launch import start, stop

    if args.replicas < 1 or args.max_batch_size < 1 or args.max_queue < 1 or not 0 < args.port < 65536:
        raise InvalidFormatError("--replicas, --max-batch-size and --max-queue must be >= 1 and --port in 1..65535.")
    options = ServeOptions(
        model=args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, roots=args.lora_root,
        allow_hub=args.allow_hub, host_budget_bytes=args.host_budget_mb << 20,
        device_budget_bytes=args.device_budget_mb << 20, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, api_key_hashes=load_key_hashes(args.api_key_file),
    )
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    # Installed before Ray starts and again after (the driver's ray.init installs its own SIGTERM
    # handler); set explicitly because a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        url = start(options, host=args.host, port=args.port, replicas=args.replicas, address=args.address,
                    dashboard=args.dashboard)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        keys = " (API keys required)" if options.api_key_hashes else ""
        print(f"serving on {url}{keys} (POST /generate, GET /health); Ctrl-C stops", flush=True)
        while not stopping.wait(0.5):
            pass
        print("stopping: finishing the requests in flight", file=sys.stderr, flush=True)
    finally:
        with quiet_stderr():
            stop(drain_timeout_s=DRAIN_TIMEOUT_S)
    return 0


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Ray's own shutdown chatter (its actors and workers going away, printed by its log streamer)
    is not the user's concern once the drain message is out: stderr goes to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
