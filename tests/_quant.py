"""Shared fixtures for the quantized-backend tests: quantized copies of tiny models and GGUF files.

Every quantized model is built from a tiny random model at test time; the dense reference is a copy
of that model whose Linear weights are the quantized weights decoded by an independent reference
(the library's own dequantizer or a hand-written decoder), never by the backend under test.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zimage_lora.examples import linear_names, tiny_config, tiny_model
from zimage_lora.keys.aliases import native_name

Decode = Callable[[torch.nn.Module], "torch.Tensor | None"]


def dense_reference(model: torch.nn.Module, decode: Decode) -> torch.nn.Module:
    """A plain-Linear copy of `model` whose weights are `decode(module)` for each quantized layer."""
    from diffusers import ZImageTransformer2DModel

    dense = ZImageTransformer2DModel(**tiny_config(**_overrides(model)))
    state = {}
    for name, module in model.named_modules():
        weight = decode(module) if name else None
        if weight is not None:
            state[name + ".weight"] = weight.float()
            if getattr(module, "bias", None) is not None:
                state[name + ".bias"] = module.bias.detach().float()
    # Parameters and buffers, not `state_dict()`: bitsandbytes' `_save_to_state_dict` converts a 4-bit
    # weight out of its CPU-kernel layout in place (and, for non-nested absmax, leaves it transposed).
    wanted = dense.state_dict()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in state and name in wanted and tensor.is_floating_point():
            state[name] = tensor.detach().float()
    missing = set(dense.state_dict()) - set(state)
    assert not missing, missing
    dense.load_state_dict(state)
    return dense.eval()


def _overrides(model: torch.nn.Module) -> dict:
    cfg = dict(model.config)
    keys = set(tiny_config())
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in keys}


Make = Callable[[str, torch.nn.Linear], "torch.nn.Module | None"]


def replace_linears(model: torch.nn.Module, make: Make) -> list[str]:
    """Swap each Linear for `make(name, linear)` where that returns a module; returns the swapped names."""
    swapped = []
    for name in linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make(name, getattr(parent, child))
        if new is not None:
            setattr(parent, child, new)
            swapped.append(name)
    return swapped


def output_rel(a: torch.Tensor, b: torch.Tensor, effect: torch.Tensor) -> float:
    """||a - b|| relative to the size of the adapter's effect on the output."""
    return float((a - b).norm() / effect.norm())


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- GGUF ---------------------------------------------------------------------------------------------

def kquant_blocks(qtype, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid random K-quant bytes (rows, cols/256*type_size) with weights of size about 1/sqrt(cols).

    The gguf package has no K-quant encoder, so blocks are built directly: random codes and
    sub-block scales, and super-block scales chosen to give the magnitude of a real weight.
    """
    import gguf

    q = gguf.GGMLQuantizationType
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    target = 1.0 / math.sqrt(cols)
    if qtype == q.Q6_K:  # ql, qh, 16 int8 scales, then d
        scales = rng.integers(-40, 40, size=(blocks.shape[0], 16)).astype(np.int8)
        blocks[:, 192:208] = scales.view(np.uint8)
        d = np.float16(target / (32 * 20))
        blocks[:, 208:210] = np.full((blocks.shape[0], 1), d, dtype=np.float16).view(np.uint8)
    else:  # Q2_K..Q5_K with d and dmin: d, dmin first for Q4_K/Q5_K
        levels = {q.Q4_K: 15, q.Q5_K: 31}[qtype]
        d = np.float16(target / (32 * levels / 2))
        dmin = np.float16(float(d) * levels / 2)
        blocks[:, 0:2] = np.full((blocks.shape[0], 1), d, dtype=np.float16).view(np.uint8)
        blocks[:, 2:4] = np.full((blocks.shape[0], 1), dmin, dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def gguf_bytes(weight: torch.Tensor, qtype, seed: int = 0) -> np.ndarray:
    import gguf

    from zimage_lora.backends.gguf_backend import WRITABLE

    if qtype in WRITABLE:
        return gguf.quants.quantize(weight.float().numpy(), qtype)
    return kquant_blocks(qtype, weight.shape[0], weight.shape[1], seed)


def reference_dequant(data: np.ndarray, qtype) -> torch.Tensor:
    """gguf's own numpy decoder (independent of diffusers' torch decoder used by the backend)."""
    import gguf

    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))


def native_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the original Z-Image layout: fused attention qkv, native names."""
    state = {}
    sd = model.state_dict()
    for key, tensor in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [sd[key.replace("to_q", s)] for s in ("to_q", "to_k", "to_v")]
            state[key.replace("to_q", "qkv")] = torch.cat(parts, 0)
            continue
        module, _, leaf = key.rpartition(".")
        state[native_name(module) + "." + leaf if module else key] = tensor
    return state


def write_gguf(model: torch.nn.Module, path: Path, pick: Callable[[str, torch.Tensor], object | None]) -> None:
    """Write `model` as a native-layout GGUF file; `pick(key, tensor)` gives the quant type or None (F32)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="z_image")
    for key, tensor in native_state_dict(model).items():
        qtype = pick(key, tensor) if tensor.dim() == 2 and key.endswith(".weight") else None
        if qtype is None:
            writer.add_tensor(key, tensor.float().numpy())
        else:
            data = gguf_bytes(tensor, qtype, seed=len(key))
            writer.add_tensor(key, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_gguf_model(path: Path, config_dir: Path, **overrides) -> torch.nn.Module:
    """Load a GGUF file the way users do: diffusers' from_single_file with GGUFQuantizationConfig."""
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    ZImageTransformer2DModel(**tiny_config(**overrides)).save_config(config_dir)
    model = ZImageTransformer2DModel.from_single_file(
        str(path),
        config=str(config_dir),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    )
    return model.eval()


def quantized_copy(seed: int = 0, **overrides) -> torch.nn.Module:
    return copy.deepcopy(tiny_model(seed, **overrides))


# --- the engine-level check shared by every backend -------------------------------------------------------

def check_engine(
    quant: torch.nn.Module,
    dense: torch.nn.Module,
    adapter: Path,
    raw_state: Callable[[torch.nn.Module], dict[str, bytes]],
    decode: Decode,
    *,
    scale: float = 0.8,
    dynamic_tol: float = 1e-4,
    merged: bool = True,
) -> dict[str, float]:
    """Dynamic, merged and restore on `quant` against `dense` (its decoded copy). Returns the reported losses.

    dynamic: output equals the dense model with the same adapter, relative to the adapter's effect.
    merged: the reported per-layer loss is recomputed independently (decoded merged weight vs the dense
    model's merged weight) and the output error stays within it. restore: raw storage and output exact.
    """
    from zimage_lora import apply_adapter, remove_adapter
    from zimage_lora.examples import run_model, tiny_inputs

    inputs = tiny_inputs(3)
    before = raw_state(quant)
    base_q, base_d = run_model(quant, inputs), run_model(dense, inputs)

    apply_adapter(dense, adapter, scale=scale, mode="dynamic", name="a")
    expected = run_model(dense, inputs)
    effect = expected - base_d
    assert effect.norm() > 1e-3 * base_d.norm()

    apply_adapter(quant, adapter, scale=scale, mode="dynamic", name="a")
    got = run_model(quant, inputs)
    assert output_rel(got, expected, effect) < dynamic_tol
    remove_adapter(quant)
    assert raw_state(quant) == before
    assert torch.equal(run_model(quant, inputs), base_q)
    if not merged:
        return {}

    remove_adapter(dense)
    dense_w = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    apply_adapter(dense, adapter, scale=scale, mode="merged", name="a")
    report = apply_adapter(quant, adapter, scale=scale, mode="merged", name="a")
    assert report.requant_loss, "a merge into quantized layers reports its requantization loss"
    for name, loss in report.requant_loss.items():
        target = dense.get_submodule(name).weight.detach()
        delta = (target - dense_w[name]).norm()
        stored = decode(quant.get_submodule(name))
        assert stored is not None, name
        mine = float((stored.float() - target).norm() / delta)
        assert abs(mine - loss) <= 1e-3 * max(loss, 1e-3) + 1e-5, (name, mine, loss)
    worst = max(report.requant_loss.values())
    merged_out = run_model(quant, inputs)
    assert output_rel(merged_out, expected, effect) <= 2 * worst + dynamic_tol

    remove_adapter(quant)
    assert raw_state(quant) == before
    assert torch.equal(run_model(quant, inputs), base_q)
    return dict(report.requant_loss)


def lowrank_delta(base: torch.Tensor, rank: int = 16, ratio: float = 0.2, seed: int = 1) -> torch.Tensor:
    """A rank-`rank` delta for `base` (out, in) with norm `ratio * ||base||` (as in bench/quant_requant_loss.py)."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(base.shape[0], rank, generator=g) @ torch.randn(rank, base.shape[1], generator=g)
    return delta * (ratio * base.norm() / delta.norm())


def raw_state(
    model: torch.nn.Module, quant_bytes: Callable[[torch.nn.Module], dict[str, bytes] | None]
) -> dict[str, bytes]:
    """Stored bytes of every plain parameter, plus `quant_bytes(module)` of each quantized layer."""
    out = {}
    for name, module in model.named_modules():
        stored = quant_bytes(module)
        if stored is not None:
            out |= {f"{name}.{k}": v for k, v in stored.items()}
    for name, p in model.named_parameters():
        if type(p) is torch.nn.Parameter:
            out[name] = raw_bytes(p)
    return out
