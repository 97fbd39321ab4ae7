"""GGUF layers loaded through diffusers from a native-layout (fused qkv) Z-Image GGUF file.

Files are written at test time with the gguf package: legacy block formats with its encoder, K-quants
(which it cannot encode) from valid random blocks built byte by byte.
"""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf", reason="gguf is in the [quant] extra: pip install -e '.[test,quant]'")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _quant import (  # noqa: E402
    check_engine,
    dense_reference,
    gguf_bytes,
    load_gguf_model,
    lowrank_delta,
    raw_bytes,
    reference_dequant,
    write_gguf,
)
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor  # noqa: E402

from zimage_lora import LoRAError, apply_adapter  # noqa: E402
from zimage_lora.backends import backend_for  # noqa: E402
from zimage_lora.backends.gguf_backend import GGUFBackend, GGUFReadOnlyBackend  # noqa: E402
from zimage_lora.examples import make_adapter, run_model, tiny_inputs, tiny_model  # noqa: E402
from zimage_lora.keys.index import module_shape  # noqa: E402

Q = gguf.GGMLQuantizationType
WRITABLE = [Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0]
KQUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
WIDE = {"dim": 256, "axes_dims": [32, 48, 48], "n_layers": 1}  # K-quant blocks span 256 inputs


def layer(qtype, rows: int = 128, cols: int = 256) -> tuple[GGUFLinear, torch.Tensor]:
    torch.manual_seed(0)
    dense = torch.randn(rows, cols) / cols**0.5
    data = torch.from_numpy(gguf_bytes(dense, qtype))
    lin = GGUFLinear(cols, rows, bias=False, compute_dtype=torch.float32)
    lin.weight = GGUFParameter(data, quant_type=qtype)
    return lin, dense


@pytest.mark.parametrize("qtype", WRITABLE + KQUANTS, ids=lambda q: q.name)
def test_recognised_and_decoded(qtype):
    lin, dense = layer(qtype)
    backend = backend_for(lin)
    assert isinstance(backend, GGUFBackend if qtype in WRITABLE else GGUFReadOnlyBackend)
    assert backend.supports_merge == (qtype in WRITABLE)
    assert backend.shape(lin) == (128, 256) and module_shape(lin).shape == (128, 256)
    got = backend.get_base_weight(lin)
    assert got.dtype == torch.float32 and got.shape == (128, 256)
    # exactly what the layer computes with (diffusers' decoder), and gguf's own decoder to fp16 precision
    assert torch.equal(got, dequantize_gguf_tensor(lin.weight).float())
    ref = reference_dequant(lin.weight.as_tensor().numpy(), qtype)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-4)
    if qtype in WRITABLE:
        assert (got - dense).norm() / dense.norm() < 0.2
    x = torch.randn(3, 256)
    torch.testing.assert_close(lin(x), x @ got.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda q: q.name)
def test_requantize_in_place_and_restore_exact(qtype):
    lin, _ = layer(qtype)
    backend = backend_for(lin)
    raw = lin.weight.as_tensor()
    before, ptr = raw_bytes(raw), raw.data_ptr()
    x = torch.randn(4, 256)
    out_before = lin(x)
    snap = backend.snapshot(lin)

    base = backend.get_base_weight(lin)
    delta = lowrank_delta(base)  # rank 16, 20% of the weight's norm
    backend.set_base_weight(lin, base + delta)
    assert lin.weight.data_ptr() == ptr and lin.weight.quant_type == qtype and raw_bytes(lin.weight) != before
    # every block is gguf's own encoding of the merged block, or keeps its stored scale header
    fresh = gguf.quants.quantize((base + delta).numpy(), qtype)
    if qtype == Q.BF16:
        assert raw_bytes(lin.weight) == fresh.tobytes()
    else:
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        got, new, old = (np.frombuffer(b, np.uint8).reshape(-1, size) for b in (raw_bytes(lin.weight), fresh, before))
        header = 4 if qtype in (Q.Q4_1, Q.Q5_1) else 2
        assert ((got == new).all(1) | (got[:, :header] == old[:, :header]).all(1)).all()
    loss = float((backend.get_base_weight(lin) - base - delta).norm() / delta.norm())
    assert 0 < loss < (0.1 if qtype == Q.Q8_0 else 0.7)

    for _ in range(2):
        backend.restore(lin, snap)
        assert raw_bytes(lin.weight) == before and torch.equal(lin(x), out_before)
        backend.set_base_weight(lin, base - delta)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_kquant_merge_refused_with_dynamic_hint(qtype):
    lin, _ = layer(qtype)
    backend = backend_for(lin)
    before = raw_bytes(lin.weight)
    with pytest.raises(LoRAError, match="dynamic"):
        backend.set_base_weight(lin, backend.get_base_weight(lin))
    assert raw_bytes(lin.weight) == before


def _raw_state(model: torch.nn.Module) -> dict[str, bytes]:
    params = model.named_parameters()
    return {name: raw_bytes(p.as_tensor() if isinstance(p, GGUFParameter) else p) for name, p in params}


def _decode(module: torch.nn.Module) -> torch.Tensor | None:
    if isinstance(getattr(module, "weight", None), GGUFParameter):
        return dequantize_gguf_tensor(module.weight).float()
    return None


def _pick(writable_type, kquant_type=None):
    def pick(key: str, tensor: torch.Tensor):
        if kquant_type is not None and tensor.shape[1] % 256 == 0:
            return kquant_type
        return writable_type if tensor.shape[1] % 32 == 0 else None

    return pick


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_engine_on_gguf_file_dynamic_merged_restore(qtype, tmp_path):
    write_gguf(tiny_model(0), tmp_path / "m.gguf", _pick(qtype))
    quant = load_gguf_model(tmp_path / "m.gguf", tmp_path / "cfg")
    layers = [n for n, m in quant.named_modules() if isinstance(m, GGUFLinear)]
    assert len(layers) > 20 and "layers.0.attention.to_k" in layers
    # diffusers split the file's fused qkv: to_q/to_k/to_v share one buffer, so in-place writes must stay in rows
    att = quant.layers[0].attention
    assert att.to_q.weight.untyped_storage().data_ptr() == att.to_k.weight.untyped_storage().data_ptr()
    dense = dense_reference(quant, _decode)
    adapter = make_adapter("ai-toolkit", tmp_path / "a.safetensors", tiny_model(0), rank=4, alpha=4.0)
    losses = check_engine(quant, dense, adapter, _raw_state, _decode)
    assert "layers.0.attention.to_k" in losses and all(0 < v < 5 for v in losses.values())


def test_engine_on_kquant_file_dynamic_and_merge_refused(tmp_path):
    write_gguf(tiny_model(0, **WIDE), tmp_path / "m.gguf", _pick(Q.Q8_0, Q.Q4_K))
    quant = load_gguf_model(tmp_path / "m.gguf", tmp_path / "cfg", **WIDE)
    assert quant.layers[0].attention.to_q.weight.quant_type == Q.Q4_K
    adapter = make_adapter("ai-toolkit", tmp_path / "a.safetensors", tiny_model(0, **WIDE), rank=4, alpha=4.0)
    before = _raw_state(quant)
    base = run_model(quant, tiny_inputs(3))
    with pytest.raises(LoRAError, match="dynamic"):
        apply_adapter(quant, adapter, mode="merged")
    assert _raw_state(quant) == before and torch.equal(run_model(quant, tiny_inputs(3)), base)
    dense = dense_reference(quant, _decode)
    check_engine(quant, dense, adapter, _raw_state, _decode, merged=False)
