"""Per-sample adapter batches: their cost, and what they do for a stream of mixed-adapter requests.

    python bench/serve.py --model tiny                 # 2-block dim-64 model
    python bench/serve.py --model reduced              # Z-Image-Turbo widths (dim 3840), 1 main + 1+1 refiner block
    python bench/serve.py --model tiny --quick

1. Cost: one transformer forward of B samples, each with its own rank-r LoRA (per-sample), against
   the same batch with one shared rank-r LoRA (the normal dynamic path) and against no adapter.
   Target: per-sample <= 1.15x shared. Interleaved rounds, medians of per-round ratios.
2. Stream: N requests arriving at random (Poisson, seeded) times, each with one of K adapters, each
   request = `steps` transformer forwards at batch 1 x (image + caption tokens). Three schedulers on
   the same arrivals, real compute: ours (up to B queued requests per batch, any adapters: per-sample),
   one adapter set per batch (up to B queued requests that share the head request's set), and batch
   size 1 with switching (`set_active_adapters` per request). Requests/s and p50/p95 latency.
The transformer alone is timed (text encoder and VAE are the same for every scheduler).
Routing a large adapter catalogue over replicas (random vs affinity): bench/serve_routing.py.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved, machine, md_table, median, median_ratio, save  # noqa: E402

import zimage_lora as zl  # noqa: E402
from zimage_lora.examples import make_adapter, tiny_config, tiny_model  # noqa: E402

REDUCED = {  # Z-Image-Turbo's widths (diffusers' defaults) at reduced depth
    "dim": 3840, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560, "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512], "n_layers": 1, "n_refiner_layers": 1,
}


def build(kind: str) -> tuple[torch.nn.Module, dict]:
    cfg = tiny_config() if kind == "tiny" else tiny_config(**REDUCED)
    return tiny_model(0, **({} if kind == "tiny" else REDUCED)), cfg


def inputs(cfg: dict, batch: int, latent: int, caption: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": [torch.randn(cfg["in_channels"], 1, latent, latent, generator=g) for _ in range(batch)],
        "t": torch.full((batch,), 0.5),
        "cap_feats": [torch.randn(caption, cfg["cap_feat_dim"], generator=g) for _ in range(batch)],
    }


@torch.no_grad()
def forward(model: torch.nn.Module, inp: dict) -> None:
    model(inp["x"], inp["t"], inp["cap_feats"], return_dict=False)


def attach(model: torch.nn.Module, count: int, rank: int, folder: Path) -> list[str]:
    # All written before any is attached: files name the plain modules, as trainers write them.
    paths = [make_adapter("diffusers", folder / f"a{i}.safetensors", model, rank=rank, seed=100 + i)
             for i in range(count)]
    names = []
    for i, path in enumerate(paths):
        zl.apply_adapter(model, path, name=f"a{i}")
        names.append(f"a{i}")
    zl.set_active_adapters(model, [])
    return names


def run_cost(model, cfg, names: list[str], batch: int, latent: int, caption: int, rounds: int, steps: int) -> dict:
    """Each timed call: `steps` forwards (one request's denoising loop), inside one per-sample block."""
    inp = inputs(cfg, batch, latent, caption)

    def loop():
        for _ in range(steps):
            forward(model, inp)

    def base():
        zl.set_active_adapters(model, [])
        loop()

    def shared():
        zl.set_active_adapters(model, [names[0]])
        loop()

    def per_sample():
        zl.set_active_adapters(model, [])
        with zl.per_sample_adapters(model, [{n: 1.0} for n in names[:batch]]):
            loop()

    def per_sample_one():  # the per-sample path with every sample naming the same adapter
        with zl.per_sample_adapters(model, [{names[0]: 1.0}] * batch):
            loop()

    def block_only():  # entering and leaving a block, no forward
        with zl.per_sample_adapters(model, [{n: 1.0} for n in names[:batch]]):
            pass

    times = interleaved({"base": base, "shared": shared, "per_sample": per_sample, "per_sample_same": per_sample_one},
                        "cpu", rounds, inner=1)
    block = interleaved({"block": block_only}, "cpu", 5)["block"]
    zl.set_active_adapters(model, [])
    return {
        "ms": {k: 1e3 * median(v) for k, v in times.items()},
        "block_enter_exit_ms": 1e3 * median(block),
        "per_sample_over_shared": median_ratio(times["per_sample"], times["shared"]),
        "per_sample_same_over_shared": median_ratio(times["per_sample_same"], times["shared"]),
        "shared_over_base": median_ratio(times["shared"], times["base"]),
    }


def run_stream(model, cfg, names: list[str], n: int, max_batch: int, steps: int, latent: int, caption: int,
               load: float, seed: int = 0) -> dict:
    """Each scheduler on the same arrival times; `load` = arrival rate x batch-1 service time."""
    one = inputs(cfg, 1, latent, caption)
    zl.set_active_adapters(model, [names[0]])
    t0 = time.perf_counter()
    for _ in range(3 * steps):
        forward(model, one)
    single = (time.perf_counter() - t0) / 3  # seconds per batch-1 request
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(load / single)
        arrivals.append(t)
    adapters = [rng.choice(names) for _ in range(n)]
    batches = {b: inputs(cfg, b, latent, caption) for b in range(1, max_batch + 1)}

    def serve(policy: str) -> dict:
        done = [0.0] * n
        queue: list[int] = []
        nxt = 0
        start = time.perf_counter()
        sizes = []
        while nxt < n or queue:
            now = time.perf_counter() - start
            while nxt < n and arrivals[nxt] <= now:
                queue.append(nxt)
                nxt += 1
            if not queue:
                time.sleep(max(0.0, arrivals[nxt] - now))
                continue
            if policy == "ours":
                pick = queue[:max_batch]
            elif policy == "one set per batch":
                pick = [i for i in queue if adapters[i] == adapters[queue[0]]][:max_batch]
            else:
                pick = queue[:1]
            queue = [i for i in queue if i not in pick]
            sizes.append(len(pick))
            inp = batches[len(pick)]
            if policy == "ours":
                with zl.per_sample_adapters(model, [{adapters[i]: 1.0} for i in pick]):
                    for _ in range(steps):
                        forward(model, inp)
            else:
                zl.set_active_adapters(model, [adapters[pick[0]]])
                for _ in range(steps):
                    forward(model, inp)
            end = time.perf_counter() - start
            for i in pick:
                done[i] = end
        lat = sorted(done[i] - arrivals[i] for i in range(n))
        return {
            "requests_per_s": n / (max(done) - arrivals[0]),
            "p50_s": statistics.median(lat),
            "p95_s": lat[min(n - 1, int(0.95 * n))],
            "mean_batch": sum(sizes) / len(sizes),
        }

    out = {"single_request_s": single, "load": load}
    for policy in ("ours", "one set per batch", "batch 1 + switching"):
        out[policy] = serve(policy)
    zl.set_active_adapters(model, [])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "reduced"], default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters in the stream (K)")
    p.add_argument("--requests", type=int, default=0, help="stream length (default: 64 tiny, 16 reduced)")
    p.add_argument("--steps", type=int, default=0, help="forwards per request (default: 4 tiny, 1 reduced)")
    p.add_argument("--load", type=float, default=2.0, help="arrival rate x batch-1 service time")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--latent", type=int, default=0, help="latent side (default: 16 tiny, 32 reduced)")
    p.add_argument("--no-stream", action="store_true", help="only the cost comparison")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.model == "tiny"
    latent, caption = args.latent or (16 if tiny else 32), 32  # tokens per sample: image (latent/2)^2 + caption
    rounds = args.rounds or (3 if args.quick else (15 if tiny else 5))
    n = args.requests or ((24 if args.quick else 64) if tiny else (8 if args.quick else 16))
    steps = args.steps or (4 if tiny else 1)
    model, cfg = build(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        names = attach(model, max(args.adapters, args.batch), args.rank, Path(tmp))
        cost = run_cost(model, cfg, names, args.batch, latent, caption, rounds, steps)
        stream = {"single_request_s": float("nan")} if args.no_stream else run_stream(
            model, cfg, names[: args.adapters], n, args.batch, steps, latent, caption, args.load)
    tokens = (latent // 2) ** 2 + caption
    title = (f"Per-sample adapters, {args.model} model ({'dim 64, 2+1+1 blocks' if tiny else 'dim 3840, 1+1+1 blocks'}"
             f"), fp32, cpu, {torch.get_num_threads()} threads; B={args.batch}, rank {args.rank}, "
             f"{tokens} tokens per sample.")
    table = [title, "", md_table([f"{steps} forward(s) of B samples", "ms (median)"],
                                 [[k, v] for k, v in cost["ms"].items()]),
             "", f"entering + leaving a per-sample block (once per call): {cost['block_enter_exit_ms']:.2f} ms",
             "", f"per-sample / shared: {cost['per_sample_over_shared']:.3f} (target <= 1.15: "
             f"{'MET' if cost['per_sample_over_shared'] <= 1.15 else 'NOT MET'}); same adapter through the per-sample "
             f"path / shared: {cost['per_sample_same_over_shared']:.3f}; shared / base: {cost['shared_over_base']:.3f}",
             "", f"Stream: {n} requests, {args.adapters} adapters chosen at random, {steps} forward(s) each, Poisson "
             f"arrivals at {args.load:g}x the batch-1 capacity (batch-1 request: "
             f"{stream['single_request_s'] * 1e3:.1f} ms); max batch {args.batch}.", "",
             md_table(["scheduler", "requests/s", "p50 latency s", "p95 latency s", "mean batch"],
                      [[k, v["requests_per_s"], v["p50_s"], v["p95_s"], v["mean_batch"]]
                       for k, v in stream.items() if isinstance(v, dict)])]
    if args.no_stream:
        table = table[:table.index("") + 6]  # title, cost table, block entry, ratios
    text = "machine: " + str(machine("cpu")) + "\n\n" + "\n".join(table)
    print(text)
    name = f"serve-{args.model}-cpu" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    save(name, {"args": vars(args), "cost": cost, "stream": stream, "machine": machine("cpu")}, text)


if __name__ == "__main__":
    main()
