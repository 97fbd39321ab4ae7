"""Row blocks of a target's delta, added into an fp32 block of the weight in place.

Merging works on a few hundred rows at a time so the extra memory stays far below one fp32 copy of
the layer. Every algorithm has a cheap row slice: LoRA and LoHa slice their left factor, LoKr takes
the rows of W1 that cover the block, full diffs slice the diff.
"""

from __future__ import annotations

import torch

from .. import algorithms
from ..adapter import Target
from ..algorithms._shapes import as_matrix
from ..algorithms.dora import dora_merged
from ..algorithms.lokr import factors as lokr_factors


class Prepared:
    """A target's factors cast to fp32 once per merge, with its row placement in the module."""

    def __init__(self, target: Target, out_features: int, device: torch.device | None = None) -> None:
        self.target = target
        # Factors live on the CPU after loading; the weight may be on an accelerator.
        self.device = device
        self.mod_lo, self.mod_hi = target.rows if target.rows is not None else (0, out_features)
        self.d0 = target.delta_rows[0] if target.delta_rows is not None else 0
        t = target.tensors
        algo = target.algorithm
        self.parts: dict[str, torch.Tensor] = {}
        if algo == "lora":
            down = as_matrix(t["down"]).float()
            if "mid" in t:
                down = as_matrix(t["mid"]).float() @ down
            self.parts = {"up": as_matrix(t["up"]).float(), "down": down}
        elif algo == "lokr":
            self.parts["w1"], self.parts["w2"] = lokr_factors(t, torch.float32)
        elif algo == "loha":
            for i in (1, 2):
                a = as_matrix(t[f"w{i}_a"]).float()
                if f"t{i}" in t:
                    a = (a.T @ as_matrix(t[f"t{i}"]).float()).contiguous()
                self.parts[f"a{i}"] = a
                self.parts[f"b{i}"] = as_matrix(t[f"w{i}_b"]).float()
        elif algo == "full" and "diff" in t:
            self.parts["diff"] = t["diff"].float()
        if device is not None:
            self.parts = {k: v.to(device) for k, v in self.parts.items()}

    @property
    def has_weight_delta(self) -> bool:
        return bool(self.parts)

    def block(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the full fp32 delta (delta coordinates), unscaled."""
        algo, p = self.target.algorithm, self.parts
        if algo == "lora":
            return p["up"][lo:hi] @ p["down"]
        if algo == "loha":
            return (p["a1"][lo:hi] @ p["b1"]) * (p["a2"][lo:hi] @ p["b2"])
        if algo == "lokr":
            w1, w2 = p["w1"], p["w2"]
            o2 = w2.shape[0]
            i0, i1 = lo // o2, (hi - 1) // o2 + 1
            return torch.kron(w1[i0:i1], w2)[lo - i0 * o2 : hi - i0 * o2]
        if algo == "full":
            return p["diff"][lo:hi]
        return algorithms.delta(algo, self.target.tensors)[lo:hi].to(self.device)

    def add_into(self, chunk: torch.Tensor, r0: int, alpha: float) -> None:
        """chunk (rows r0 .. r0+len of the module, fp32) += alpha * matching delta rows."""
        lo, hi = max(r0, self.mod_lo), min(r0 + chunk.shape[0], self.mod_hi)
        if lo >= hi:
            return
        d_lo, d_hi = lo - self.mod_lo + self.d0, hi - self.mod_lo + self.d0
        view = chunk[lo - r0 : hi - r0]
        if self.target.algorithm == "lora":
            view.addmm_(self.parts["up"][d_lo:d_hi], self.parts["down"], alpha=alpha)
        else:
            view.add_(self.block(d_lo, d_hi), alpha=alpha)

    def dora_into(self, chunk: torch.Tensor, r0: int, strength: float) -> None:
        """DoRA per output row: rows += t * (f * (W + s dW) - W), f = m / ||W + s dW||."""
        lo, hi = max(r0, self.mod_lo), min(r0 + chunk.shape[0], self.mod_hi)
        if lo >= hi:
            return
        d_lo, d_hi = lo - self.mod_lo + self.d0, hi - self.mod_lo + self.d0
        view = chunk[lo - r0 : hi - r0]
        mag = self.target.dora.magnitude.float()[lo - self.mod_lo : hi - self.mod_lo].to(view.device)
        merged = dora_merged(view, self.target.scale * self.block(d_lo, d_hi), mag, strength, True)
        view.copy_(merged)

    def dora_whole(self, weight: torch.Tensor, strength: float) -> None:
        """DoRA with the magnitude per input column: needs every row at once."""
        view = weight[self.mod_lo : self.mod_hi]
        n = self.mod_hi - self.mod_lo
        dw = self.block(self.d0, self.d0 + n)
        d = self.target.dora
        view.copy_(dora_merged(view, self.target.scale * dw, d.magnitude.to(view.device), strength, d.on_out))

    def bias_delta(self) -> tuple[int, int, torch.Tensor] | None:
        """(module row lo, hi, fp32 bias diff for those rows) or None."""
        db = self.target.tensors.get("diff_b")
        if db is None:
            return None
        n = self.mod_hi - self.mod_lo
        db = db.float().reshape(-1)[self.d0 : self.d0 + n].to(self.device)
        return self.mod_lo, self.mod_hi, db
