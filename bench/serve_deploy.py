"""Adapter affinity on a real local Ray Serve deployment: random vs affinity routing, same requests.

    python bench/serve_deploy.py                  # 2 tiny replicas, 16 adapters, 160 requests
    python bench/serve_deploy.py --replicas 4 --requests 240

A tiny model (dim 64) so the numbers are about routing and the adapter store, not compute: each
replica's host budget holds `--slots` adapters, requests name one of `--adapters` adapters drawn from
a Zipf(1) popularity, `--concurrency` clients send them over loopback. Reported per mode: the
replicas' host hit rate and adapter reads from disk per request (host misses), device hit rate and
attaches per request, requests/s, p50/p95 latency, and how many adapter sets each replica advertises
to the router at the end. Bounded: a fixed number of requests, each with a timeout; Ray binds to
127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import accumulate
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])

from _common import machine, md_table, save  # noqa: E402
from _tiny_pipeline import save_tiny_pipeline, tiny_pipeline  # noqa: E402

import zimage_lora as zl  # noqa: E402
from zimage_lora.examples import make_adapter  # noqa: E402
from zimage_lora.serving.core import ServeOptions  # noqa: E402
from zimage_lora.serving.launch import start, stop  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_inside(actor: object) -> dict:
    """Run inside a model replica's process (Ray's `__ray_call__`): that replica's counters."""
    from zimage_lora.serving.replica import MULTIPLEX_ATTR

    # Ray Serve 2.x keeps the deployment's instance here (private; fine for a benchmark).
    server = getattr(getattr(getattr(actor, "_replica_impl", None), "_user_callable_wrapper", None),
                     "user_callable", None)
    if server is None or not hasattr(server, "engine"):
        raise RuntimeError(f"no ZImageServer instance found in {type(actor).__name__} (Ray's layout changed?)")
    advertised = getattr(getattr(server, MULTIPLEX_ATTR, None), "models", ())
    return {**server.engine.stats(), "advertised_sets": len(advertised)}


def replica_stats(replicas: int) -> dict[str, dict]:
    """Every model replica's counters, asked of each replica actor directly (an HTTP /stats call
    reaches one replica, as the router chooses, so it cannot be relied on to reach them all)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ZImageServer" in a["name"]]
    assert len(names) == replicas, names
    actors = [ray.get_actor(name, namespace="serve") for name in names]
    return dict(zip(names, ray.get([a.__ray_call__.remote(_stats_inside) for a in actors], timeout=60), strict=True))


def run_mode(url: str, replicas: int, bodies: list[dict], concurrency: int) -> dict:
    before = replica_stats(replicas)

    def one(body: dict) -> float:
        t = time.perf_counter()
        req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            r.read()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = sorted(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    after = replica_stats(replicas)

    def delta(field: str) -> int:
        return sum(after[k]["store"][field] - before[k]["store"][field] for k in after)

    misses, hits = delta("host_misses"), delta("host_hits")
    attaches, attached = delta("device_misses"), delta("device_hits")
    return {"host_hit_rate": hits / max(hits + misses, 1), "disk_loads_per_request": misses / len(bodies),
            "device_hit_rate": attached / max(attached + attaches, 1), "attaches_per_request": attaches / len(bodies),
            "requests_per_s": len(bodies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
            "advertised_sets": {k[-8:]: v["advertised_sets"] for k, v in after.items()},
            "requests_per_replica": {k[-8:]: v["requests"] - before[k]["requests"] for k, v in after.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--slots", type=int, default=4, help="adapters one replica's host budget holds")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    rng = random.Random(0)
    cdf = list(accumulate(1.0 / (i + 1) for i in range(args.adapters)))
    picks = [min(bisect_left(cdf, rng.random() * cdf[-1]), args.adapters - 1) for _ in range(args.requests)]
    bodies = [{"prompt": f"request {i}", "seed": i, "steps": 1, "width": 32, "height": 32,
               "loras": [{"source": f"a{a}.safetensors", "strength": 0.8}]} for i, a in enumerate(picks)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_pipeline(Path(tmp) / "model")
        root = Path(tmp) / "loras"
        root.mkdir()
        transformer = tiny_pipeline(0).transformer
        for i in range(args.adapters):
            make_adapter("diffusers", root / f"a{i}.safetensors", transformer, seed=i + 1)
        size = zl.load_adapter(root / "a0.safetensors", transformer).nbytes()
        base = ServeOptions(model=str(model), dtype="fp32", device="cpu", roots=[str(root)], max_batch_size=4,
                            batch_wait_timeout_s=0.02, host_budget_bytes=args.slots * size,
                            device_budget_bytes=args.slots * size)
        for mode in ("random", "affinity"):
            url = start(replace(base, affinity=mode == "affinity"), port=free_port(), replicas=args.replicas,
                        num_gpus=0, num_cpus=args.replicas + 1, ready_timeout_s=600)
            try:
                results[mode] = run_mode(url, args.replicas, bodies, args.concurrency)
            finally:
                stop()
    title = (f"Local Ray Serve deployment, {args.replicas} tiny replicas (dim 64, fp32, CPU), {args.adapters} "
             f"adapters with Zipf(1) popularity, host budget {args.slots} adapters per replica, {args.requests} "
             f"requests (1 step, 32x32) from {args.concurrency} concurrent clients over loopback.")
    table = md_table(["routing", "host hit rate", "disk loads / request", "device hit rate", "attaches / request",
                      "requests/s", "p50 s", "p95 s", "images per replica", "sets advertised at the end"],
                     [[m, r["host_hit_rate"], r["disk_loads_per_request"], r["device_hit_rate"],
                       r["attaches_per_request"], r["requests_per_s"], r["p50_s"], r["p95_s"],
                       " ".join(str(v) for v in r["requests_per_replica"].values()),
                       " ".join(str(v) for v in r["advertised_sets"].values())] for m, r in results.items()])
    text = "machine: " + str(machine("cpu")) + "\n\n" + title + "\n\n" + table
    print(text)
    save(f"serve-deploy-{args.replicas}r" + (f"-{args.tag}" if args.tag else ""),
         {"args": vars(args), "results": results, "machine": machine("cpu")}, text)


if __name__ == "__main__":
    main()
