"""Re-weighting and switching dynamic adapters on a model with Z-Image-Turbo's 276 Linear names (tiny
widths: 30 main + 2x2 refiner blocks): ours vs diffusers' `set_adapters` and PEFT's `set_adapter` on the
same model with the same two adapters loaded. Target: under 0.5 ms on CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import engine, md_table, median

from zimage_lora.examples import linear_names, make_adapter, tiny_model


def _per_call(fn, repeats: int) -> float:
    """Median over 9 batches of the mean seconds per call in a batch of repeats/9 calls."""
    n = max(1, repeats // 9)
    out = []
    for _ in range(9):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        out.append((time.perf_counter() - t0) / n)
    return median(out)


def run_switch(device: str, repeats: int = 1000) -> dict:
    from zimage_lora.loading import load_adapter

    model = tiny_model(0, n_layers=30, n_refiner_layers=2).to(device)
    n_linear = len(linear_names(model))
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = [make_adapter("diffusers", Path(tmp) / f"{k}.safetensors", model, rank=4, seed=i)
                 for i, k in enumerate("ab")]
        eng = engine()
        if eng is not None:
            apply_adapter, remove_adapter, set_adapter_scale = eng
            for k, f in zip("ab", files, strict=True):
                apply_adapter(model, f, mode="dynamic", name=k)
            scales = (0.3, 0.7)
            results["ours: set_adapter_scale (one adapter)"] = _per_call(
                lambda i: set_adapter_scale(model, "a", scales[i & 1]), repeats)

            def swap(i: int) -> None:
                on, off = ("a", "b") if i & 1 else ("b", "a")
                set_adapter_scale(model, on, 1.0)
                set_adapter_scale(model, off, 0.0)

            results["ours: switch a<->b (two set_adapter_scale)"] = _per_call(swap, repeats)
            try:
                from zimage_lora import Adapters
            except ImportError:
                Adapters = None  # noqa: N806 - older builds without the handle
            if Adapters is not None:
                handle = Adapters(model)
                sets = ((["a"], [1.0]), (["a", "b"], [1.0, 0.5]), (["b"], [0.7]))
                results["ours: Adapters.set_adapters (active set + weights)"] = _per_call(
                    lambda i: handle.set_adapters(*sets[i % 3]), repeats)
                handle.set_adapters(["a", "b"], [1.0, 1.0])
            adapters = [load_adapter(f, model) for f in files]
            results["ours: apply_adapter replace, same shapes (hot swap)"] = _per_call(
                lambda i: apply_adapter(model, adapters[i & 1], mode="dynamic", name="a"), max(18, repeats // 50))
            remove_adapter(model)
        peer = tiny_model(0, n_layers=30, n_refiner_layers=2).to(device)
        from safetensors.torch import load_file

        for k, f in zip("ab", files, strict=True):
            peer.load_lora_adapter(load_file(str(f)), adapter_name=k, prefix="transformer")
        weights = ([1.0, 0.5], [0.5, 1.0])
        results["diffusers: set_adapters(['a','b'], weights)"] = _per_call(
            lambda i: peer.set_adapters(["a", "b"], weights[i & 1]), max(18, repeats // 10))
        results["diffusers/PEFT: set_adapter (switch active)"] = _per_call(
            lambda i: peer.set_adapter("a" if i & 1 else "b"), max(18, repeats // 10))
    rows = [[k, v * 1e3, ("MET" if v < 5e-4 else "MISSED") if k.startswith("ours") and "hot swap" not in k else ""]
            for k, v in results.items()]
    table = (f"Switching on {n_linear} wrapped Linear layers ({device}); target < 0.5 ms.\n\n"
             + md_table(["operation", "ms per call (median)", "target"], rows))
    for k, v in results.items():
        print(f"  {k}: {v * 1e3:.4f} ms", flush=True)
    return {"n_linear": n_linear, "ms": {k: v * 1e3 for k, v in results.items()}, "table": table}
