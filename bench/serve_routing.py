"""Routing a Zipf-popular adapter catalogue over replicas: random vs adapter-affinity (simulation).

    python bench/serve_routing.py                    # the grid below, ~1 min on 2 cores
    python bench/serve_routing.py --quick

No model compute: each replica is its adapter store (a host LRU and a device LRU, budgets in bytes
of real adapters), each request names one adapter drawn from a Zipf(s) popularity over the
catalogue, and the added latency of a request is what its adapter costs on the replica it lands on:
0 when attached, `attach_s` when only in host memory, `load_s + attach_s` when read from disk.

Routing: random (any replica, what the server does today) or affinity: rendezvous hashing of the
adapter set orders the replicas, and the first one in that order whose share of the last 8R
requests is under (1 + eps) x fair takes it (consistent hashing with bounded loads: a hot adapter
spills over to its next replicas, always the same ones, instead of overloading one).

Defaults from this repository's benches: a rank-32 bf16 LoRA on every Z-Image-Turbo Linear is
192 MB (bench/load.py), reading + resolving it takes 196 ms (bench/results/load-cpu-quick-final.md,
2-core CPU), attaching it takes 25 ms on an H100 (bench/results/switch-cuda-quick-h100.md,
apply_adapter hot swap). Budgets per replica: 16 GiB host, 8 GiB device (docs/serve-config.yaml).
"""

from __future__ import annotations

import argparse
import random
import sys
from bisect import bisect_left
from collections import OrderedDict, deque
from itertools import accumulate
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, md_table, save  # noqa: E402


class Lru:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.items = capacity, OrderedDict()

    def hit(self, key: int) -> bool:
        if key in self.items:
            self.items.move_to_end(key)
            return True
        self.items[key] = None
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return False


def preferences(catalogue: int, replicas: int, seed: int) -> np.ndarray:
    """Per adapter, the replicas in rendezvous-hashing order (a fixed random score per (adapter,
    replica): adding a replica moves only the adapters it now wins)."""
    scores = np.random.default_rng(seed).random((catalogue, replicas), dtype=np.float32)
    return np.argsort(-scores, axis=1).astype(np.int16)


def simulate(catalogue: int, replicas: int, routing: str, *, requests: int, zipf_s: float, host_slots: int,
             device_slots: int, load_s: float, attach_s: float, eps: float = 0.25, seed: int = 0) -> dict:
    rng = random.Random(seed)
    cdf = list(accumulate(1.0 / (i + 1) ** zipf_s for i in range(catalogue)))
    total = cdf[-1]
    order = preferences(catalogue, replicas, seed + 1).tolist() if routing == "affinity" else None
    hosts = [Lru(host_slots) for _ in range(replicas)]
    devices = [Lru(device_slots) for _ in range(replicas)]
    window: deque[int] = deque()
    recent = [0] * replicas
    served = [0] * replicas
    added, loads, device_hits = [], 0, 0
    warm = requests // 5  # the first fifth warms the caches and is not counted
    for n in range(requests):
        adapter = min(bisect_left(cdf, rng.random() * total), catalogue - 1)
        if order is None:
            r = rng.randrange(replicas)
        else:
            cap = (1 + eps) * len(window) / replicas + 1
            r = next((c for c in order[adapter] if recent[c] < cap), order[adapter][0])
        window.append(r)
        recent[r] += 1
        if len(window) > 8 * replicas:
            recent[window.popleft()] -= 1
        on_device = devices[r].hit(adapter)
        in_host = hosts[r].hit(adapter)  # the host tier holds what is attached, too (same LRU touch)
        if n < warm:
            continue
        served[r] += 1
        if on_device:
            device_hits += 1
            added.append(0.0)
        elif in_host:
            added.append(attach_s)
        else:
            loads += 1
            added.append(load_s + attach_s)
    counted = requests - warm
    added.sort()
    return {
        "device_hit_rate": device_hits / counted,
        "loads_per_request": loads / counted,
        "p50_added_ms": 1e3 * added[counted // 2],
        "p95_added_ms": 1e3 * added[min(counted - 1, int(0.95 * counted))],
        "mean_added_ms": 1e3 * sum(added) / counted,
        "busiest_replica_share_x_fair": max(served) * replicas / counted,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalogues", default="1000,10000,100000")
    p.add_argument("--replicas", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--adapter-mb", type=float, default=192.0)
    p.add_argument("--host-gib", type=float, default=16.0)
    p.add_argument("--device-gib", type=float, default=8.0)
    p.add_argument("--load-ms", type=float, default=196.0)
    p.add_argument("--attach-ms", type=float, default=25.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    requests = 40_000 if args.quick else args.requests
    host_slots = int(args.host_gib * 1024 / args.adapter_mb)
    device_slots = int(args.device_gib * 1024 / args.adapter_mb)
    rows, results = [], []
    for catalogue in map(int, args.catalogues.split(",")):
        for replicas in map(int, args.replicas.split(",")):
            for routing in ("random", "affinity"):
                out = simulate(catalogue, replicas, routing, requests=requests, zipf_s=args.zipf, host_slots=host_slots,
                               device_slots=device_slots, load_s=args.load_ms / 1e3, attach_s=args.attach_ms / 1e3)
                results.append({"catalogue": catalogue, "replicas": replicas, "routing": routing, **out})
                rows.append([catalogue, replicas, routing, out["device_hit_rate"], out["loads_per_request"],
                             out["p50_added_ms"], out["p95_added_ms"], out["mean_added_ms"],
                             out["busiest_replica_share_x_fair"]])
    title = (f"Routing simulation: Zipf s={args.zipf:g} catalogue, one adapter per request, {requests} requests "
             f"(first fifth warms up); adapter {args.adapter_mb:g} MB, per replica {args.host_gib:g} GiB host "
             f"({host_slots} adapters) and {args.device_gib:g} GiB device ({device_slots} adapters); load "
             f"{args.load_ms:g} ms, attach {args.attach_ms:g} ms.")
    table = md_table(["catalogue", "replicas", "routing", "device hit rate", "disk loads / request", "p50 added ms",
                      "p95 added ms", "mean added ms", "busiest replica x fair share"], rows)
    text = "machine: " + str(machine("cpu")) + "\n\n" + title + "\n\n" + table
    print(text)
    save("serve-routing" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else ""),
         {"args": vars(args), "results": results, "machine": machine("cpu")}, text)


if __name__ == "__main__":
    main()
