"""`zimage-lora serve`: the Ray Serve application on a local Ray instance (or a running cluster)."""

from __future__ import annotations

import argparse
import time

SUMMARY = "serve generation with per-request adapters (Ray Serve)"

HELP = """Serve text-to-image with per-request adapters over HTTP (Ray Serve; pip install 'zimage-lora[serve]').

  GET  /health     200 "ok" once the model is loaded
  POST /generate   {"prompt": ..., "seed": 0, "steps": 9, "width": 1024, "height": 1024, "guidance": 0,
                    "loras": [{"source": "style.safetensors", "strength": 0.8}]}  ->  image/png

Concurrent requests are batched together whatever their adapters (each sample its own). Adapter
sources are read only from the --lora-root folders (and, with --allow-hub, from Hugging Face ids).

examples:
  zimage-lora serve --model ./Z-Image-Turbo --lora-root ./loras
  zimage-lora serve --model ./Z-Image-Turbo --lora-root ./loras --replicas 2 --max-batch-size 8 --port 8000
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidFormatError
    from ..serving.core import ServeOptions
    from ..serving.launch import start, stop

    if args.replicas < 1 or args.max_batch_size < 1 or not 0 < args.port < 65536:
        raise InvalidFormatError("--replicas and --max-batch-size must be >= 1 and --port in 1..65535.")
    options = ServeOptions(
        model=args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, roots=args.lora_root,
        allow_hub=args.allow_hub, host_budget_bytes=args.host_budget_mb << 20,
        device_budget_bytes=args.device_budget_mb << 20, max_batch_size=args.max_batch_size,
    )
    url = start(options, host=args.host, port=args.port, replicas=args.replicas, address=args.address)
    print(f"serving on {url} (POST /generate, GET /health); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        stop()
