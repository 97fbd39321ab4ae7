"""Dynamic (unmerged) adapters on one Linear of a real Z-Image width: our wrapped layer vs PEFT, LyCORIS
and hand-written references, all on the same weights and input, timed interleaved.

Overhead = (t_case / t_base - 1) over the plain base matmul. The FLOP floor is the extra work the adapter
adds in FLOPs: r * (in + out) / (in * out) for LoRA.

On CUDA (`python bench/run.py lora --device cuda`), "ours" goes through the Triton kernels automatically
(the second pass over the output, `triton_lora.lora_epilogue_`); "triton-epilogue" and "triton-gemm"
(one GEMM with the LoRA term in its epilogue, `triton_lora.linear_lora`) time the kernels directly,
"addmm-ref" is the unfused torch path, "peft" PEFT's LoRA layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import dtype_of, engine, interleaved, md_table, median, median_ratio

from zimage_lora.adapter import Adapter, Provenance, Target

SHAPES = {"3840->3840": (3840, 3840), "3840->10240": (3840, 10240), "10240->3840": (10240, 3840)}


class Holder(torch.nn.Module):
    """One Linear under a module name, so every library wraps it the same way."""

    def __init__(self, layer: torch.nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _linear(n_in: int, n_out: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 1 / math.sqrt(n_in))
    return layer.requires_grad_(False)


def _ours(layer: torch.nn.Linear, target: Target) -> Callable[[torch.Tensor], torch.Tensor] | None:
    eng = engine()
    if eng is None:
        return None
    apply_adapter = eng[0]
    holder = Holder(layer)
    adapter = Adapter(name="bench", format="bench", source="bench", targets=[target])
    apply_adapter(holder, adapter, mode="dynamic", name="bench")
    return holder


def _rel_err(y: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """Error relative to the adapter's own effect (ref - base), as in the engine's tests."""
    effect = (ref.float() - base.float()).norm()
    return float((y.float() - ref.float()).norm() / effect.clamp_min(1e-30))


# --- LoRA -----------------------------------------------------------------------------------------------

def lora_cases(n_in: int, n_out: int, tokens: int, rank: int, dtype: torch.dtype, device: str):
    """(cases, check) for one LoRA shape: every case computes base(x) + s * B A x."""
    from peft import LoraConfig, inject_adapter_in_model

    layer = _linear(n_in, n_out, dtype, device)
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(rank, n_in, generator=g) / math.sqrt(n_in)).to(device, dtype)
    b = (torch.randn(n_out, rank, generator=g) * 0.2).to(device, dtype)
    alpha = rank / 2
    s = alpha / rank
    x = torch.randn(1, tokens, n_in, generator=g).to(device, dtype)
    w = layer.weight

    def ref() -> torch.Tensor:
        x2 = x.view(-1, n_in)
        y = F.linear(x2, w)
        y.addmm_(x2 @ a.T, b.T, alpha=s)
        return y.view(1, tokens, n_out)

    def peft_holder(adapter_dtype: torch.dtype) -> torch.nn.Module:
        h = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=["layer"]), Holder(_linear(n_in, n_out, dtype, device))
        )
        with torch.no_grad():
            h.layer.base_layer.weight.copy_(w)
            h.layer.lora_A["default"].to(adapter_dtype).weight.copy_(a)
            h.layer.lora_B["default"].to(adapter_dtype).weight.copy_(b)
        return h.requires_grad_(False)

    cases: dict[str, Callable[[], object]] = {
        "base": lambda: layer(x),
        "addmm-ref": ref,
    }
    peft_same = peft_holder(dtype)
    cases["peft"] = lambda: peft_same(x)
    if dtype != torch.float32:
        peft_fp32 = peft_holder(torch.float32)  # PEFT's default: fp32 adapters on a low-precision base
        cases["peft-fp32-adapter"] = lambda: peft_fp32(x)
    target = Target(module="layer", algorithm="lora", tensors={"down": a, "up": b}, scale=s, rank=rank,
                    about=Provenance(alpha=alpha))
    ours = _ours(_linear(n_in, n_out, dtype, device), target)
    if ours is not None:
        cases["ours"] = lambda: ours(x)
    cases.update(_triton_cases(x.view(-1, n_in), w, a, b, s, tokens, n_out))
    floor = rank * (n_in + n_out) / (n_in * n_out)

    def check() -> dict[str, float]:
        with torch.no_grad():
            base, want = layer(x), ref()
            return {k: _rel_err(cases[k](), want, base) for k in cases if k not in ("base", "addmm-ref")}

    return cases, floor, check


def _triton_cases(x2, w, a, b, s, tokens, n_out) -> dict[str, Callable[[], object]]:
    """The Triton kernels called directly (CUDA with triton only)."""
    if not x2.is_cuda:
        return {}
    try:
        from zimage_lora.apply import triton_lora
    except ImportError:
        return {}
    if not triton_lora.available(x2):
        return {}

    def epilogue() -> torch.Tensor:
        y = F.linear(x2, w)
        triton_lora.lora_epilogue_(y, x2, a, b, s)
        return y.view(1, tokens, n_out)

    def gemm() -> torch.Tensor:
        return triton_lora.linear_lora(x2, w, None, a, b, s).view(1, tokens, n_out)

    return {"triton-epilogue": epilogue, "triton-gemm": gemm}


# --- LoKr -----------------------------------------------------------------------------------------------

def lokr_cases(n_in: int, n_out: int, tokens: int, rank: int, dtype: torch.dtype, device: str, factorised: bool):
    """PEFT's LoKr creates the factors (its own factorisation of the widths); we and LyCORIS reuse them."""
    from peft import LoKrConfig, inject_adapter_in_model

    layer = _linear(n_in, n_out, dtype, device)
    w = layer.weight
    # PEFT keeps w2 whole when r >= max(w2 dims) / 2; a huge r forces the full (non-factorised) form.
    r = rank if factorised else 1 << 20
    alpha = float(r) if not factorised else rank / 2
    cfg = LoKrConfig(r=r, alpha=alpha, target_modules=["layer"], decompose_factor=-1)
    peft_h = inject_adapter_in_model(cfg, Holder(_linear(n_in, n_out, dtype, device))).requires_grad_(False)
    pl = peft_h.layer
    g = torch.Generator().manual_seed(2)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            params = getattr(pl, name, None)
            if params is not None and "default" in params:
                p = params["default"]
                p.data = (torch.randn(p.shape, generator=g) * 0.1).to(device, dtype)
                tensors[name[5:]] = p.data
        pl.base_layer.weight.copy_(w)
    s = float(pl.scaling["default"])
    x = torch.randn(1, tokens, n_in, generator=g).to(device, dtype)
    from zimage_lora.algorithms import lokr

    w1, w2 = lokr.factors(tensors, dtype)

    def ref() -> torch.Tensor:
        return F.linear(x, w) + s * lokr.kron_apply(x, w1, w2)

    cases: dict[str, Callable[[], object]] = {"base": lambda: layer(x), "kron-ref": ref, "peft-lokr": lambda: peft_h(x)}
    cases.update(_lycoris_lokr(w, tensors, s, r, alpha, x, dtype, device))
    target = Target(module="layer", algorithm="lokr", tensors=dict(tensors), scale=s,
                    rank=rank if factorised else None)
    ours = _ours(_linear(n_in, n_out, dtype, device), target)
    if ours is not None:
        cases["ours"] = lambda: ours(x)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    def check() -> dict[str, float]:
        with torch.no_grad():
            base, want = layer(x), ref()
            return {k: _rel_err(cases[k](), want, base) for k in cases if k not in ("base", "kron-ref")}

    return cases, shapes, check


def _lycoris_lokr(w, tensors, s, r, alpha, x, dtype, device) -> dict[str, Callable[[], object]]:
    """LyCORIS's LokrModule (same factorisation rule as PEFT) in its bypass and weight-rebuild forwards."""
    try:
        from lycoris.modules.lokr import LokrModule
    except ImportError:
        return {}
    n_out, n_in = w.shape
    out: dict[str, Callable[[], object]] = {}
    for bypass in (True, False):
        org = _linear(n_in, n_out, dtype, device)
        with torch.no_grad():
            org.weight.copy_(w)
        mod = LokrModule("bench", org, 1.0, lora_dim=r, alpha=alpha, factor=-1, bypass_mode=bypass)
        own = {k: getattr(mod, f"lokr_{k}", None) for k in tensors}
        if any(own[k] is None or tuple(own[k].shape) != tuple(v.shape) for k, v in tensors.items()):
            continue  # LyCORIS chose other factor shapes: not the same work, leave it out
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].data = v.clone()
        mod.scale = s
        mod.to(device, dtype).requires_grad_(False)
        mod.apply_to()
        out["lycoris-bypass" if bypass else "lycoris-rebuild"] = (lambda o: lambda: o(x))(org)
    return out


# --- runner ---------------------------------------------------------------------------------------------

def run_lora(grid: list[tuple], device: str, rounds: int, log=print) -> list[dict]:
    rows = []
    for shape, tokens, rank, dt in grid:
        n_in, n_out = SHAPES[shape]
        with torch.no_grad():
            cases, floor, check = lora_cases(n_in, n_out, tokens, rank, dtype_of(dt), device)
            errs = check()
            times = interleaved(cases, device, rounds)
        row = {"shape": shape, "tokens": tokens, "rank": rank, "dtype": dt, "device": device,
               "base_ms": median(times["base"]) * 1e3, "floor_pct": floor * 100, "rel_err": errs}
        for k in cases:
            if k != "base":
                row[f"{k}_pct"] = (median_ratio(times[k], times["base"]) - 1) * 100
        row["target_pct"] = 1.15 * row["floor_pct"] + 1.0
        rows.append(row)
        log(_lora_line(row))
        del cases
    return rows


def _lora_line(row: dict) -> str:
    parts = [f"{row['shape']:>12} n={row['tokens']:<5} r={row['rank']:<4} {row['dtype']:<5}",
             f"base {row['base_ms']:8.2f} ms", f"floor {row['floor_pct']:5.2f}%"]
    for k in ("addmm-ref", "peft", "peft-fp32-adapter", "triton-epilogue", "triton-gemm", "ours"):
        if f"{k}_pct" in row:
            parts.append(f"{k} {row[f'{k}_pct']:+6.2f}%")
    if "ours_pct" in row:
        verdict = "MET" if row["ours_pct"] <= row["target_pct"] and row["ours_pct"] < row["peft_pct"] else "MISSED"
        parts.append(f"target <= {row['target_pct']:.2f}% and < peft: {verdict}")
    return "  ".join(parts)


def lora_table(rows: list[dict]) -> str:
    header = ["shape", "tokens", "rank", "dtype", "base ms", "FLOP floor %", "target %", "ours %", "addmm ref %",
              "PEFT %", "PEFT fp32-adapter %", "ours/target"]
    cuda = any("triton-gemm_pct" in r for r in rows)
    if cuda:
        header[8:8] = ["triton 2nd pass %", "triton GEMM epilogue %"]
    body = []
    for r in rows:
        ours = r.get("ours_pct")
        row = [r["shape"], r["tokens"], r["rank"], r["dtype"], r["base_ms"], r["floor_pct"], r["target_pct"],
               ours, r.get("addmm-ref_pct"), r.get("peft_pct"), r.get("peft-fp32-adapter_pct"),
               None if ours is None else ours / r["target_pct"]]
        if cuda:
            row[8:8] = [r.get("triton-epilogue_pct"), r.get("triton-gemm_pct")]
        body.append(row)
    return md_table(header, body)


def run_lokr(grid: list[tuple], device: str, rounds: int, log=print) -> list[dict]:
    rows = []
    for shape, tokens, rank, dt, factorised in grid:
        n_in, n_out = SHAPES[shape]
        with torch.no_grad():
            cases, shapes, check = lokr_cases(n_in, n_out, tokens, rank, dtype_of(dt), device, factorised)
            errs = check()
            times = interleaved(cases, device, rounds)
        row = {"shape": shape, "tokens": tokens, "rank": rank if factorised else None, "dtype": dt, "device": device,
               "kind": "factorised" if factorised else "full", "factors": shapes,
               "base_ms": median(times["base"]) * 1e3, "rel_err": errs}
        for k in cases:
            if k != "base":
                row[f"{k}_pct"] = (median_ratio(times[k], times["base"]) - 1) * 100
        if "ours_pct" in row:  # undefined when noise puts our overhead at or below zero
            row["peft_over_ours"] = row["peft-lokr_pct"] / row["ours_pct"] if row["ours_pct"] > 0 else None
        rows.append(row)
        line = f"{shape:>12} n={tokens:<5} {row['kind']:<10} {dt:<5} factors {shapes} base {row['base_ms']:.2f} ms"
        for k in cases:
            if k != "base":
                line += f"  {k} {row[f'{k}_pct']:+.1f}%"
        if row.get("peft_over_ours") is not None:
            line += f"  PEFT/ours {row['peft_over_ours']:.1f}x (target >= 5x)"
        log(line)
        del cases
    return rows


def lokr_table(rows: list[dict]) -> str:
    header = ["shape", "tokens", "LoKr", "dtype", "factors", "base ms", "ours %", "kron ref %", "PEFT LoKr %",
              "LyCORIS bypass %", "LyCORIS rebuild %", "PEFT/ours"]
    body = [[r["shape"], r["tokens"], r["kind"] + ("" if r["rank"] is None else f" r{r['rank']}"), r["dtype"],
             " ".join(f"{k}{list(v)}" for k, v in r["factors"].items()), r["base_ms"], r.get("ours_pct"),
             r.get("kron-ref_pct"), r.get("peft-lokr_pct"), r.get("lycoris-bypass_pct"), r.get("lycoris-rebuild_pct"),
             r.get("peft_over_ours")] for r in rows]
    return md_table(header, body)
