"""BOFT and IA3 math against LyCORIS 4.1.3's own modules, and diag-OFT / BOFT at Z-Image's widths
(the method as in `test_lycoris_extra.py`: LyCORIS builds, fills and saves the network; our pure
functions are compared with its `get_diff_weight`, its default forward and its bypass forward)."""

from __future__ import annotations

import pytest
import torch

lycoris = pytest.importorskip("lycoris", reason="LyCORIS is not installed (pip install lycoris-lora)")

from _lycoris_net import (  # noqa: E402, F401 - _keep_presets is an autouse fixture
    IN,
    OFT_CASES,
    OUT,
    PREFIX,
    STRENGTHS,
    Rows,
    _bias_term,
    _close,
    _keep_presets,
    _kernel_out,
    _lycoris_delta_out,
    _network,
    _plain,
    _row_blocks,
    _x,
)

from zimage_lora.algorithms import boft, ia3, oft  # noqa: E402


# --- BOFT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("constraint,rescaled", OFT_CASES[:4])
def test_boft(tmp_path, constraint, rescaled):
    dim = 4  # power2factorization(64, 4): blocks of 4, 16 of them, boft_m = 5 butterfly stages
    model, module, t = _network(tmp_path, "boft", dim, 1.0, 5, constraint=constraint, rescaled=rescaled)
    assert sorted(t) == ["alpha", "oft_blocks"] + (["rescale"] if rescaled else [])
    shapes = {k: tuple(v.shape) for k, v in t.items()}
    assert shapes["oft_blocks"] == (5, 16, 4, 4)
    w = model.layer.weight.detach()
    assert boft.delta_shape(shapes) == (OUT, 0)
    boft.check_weight(shapes, tuple(w.shape))
    assert boft.row_align(t) == OUT
    d = boft.delta(t, w)
    _close(d, module.get_diff_weight(multiplier=1.0)[0])
    # Column blocks of the delta need only the same columns of W (rows need all of W).
    parts = boft.row_parts(t)
    cols = torch.cat([boft.delta_cols(parts, w[:, c0:c1]) for c0, c1 in ((0, 5), (5, 30), (30, IN))], dim=1)
    _close(cols, d)
    _close(_row_blocks(boft, t, w), d)
    x = _x()
    _close(boft.bypass(x, t, w), x @ d.T)
    kind, p = boft.prepare(t, 1.0, Rows(), w)
    assert kind == "boft"
    _close(_kernel_out(boft.add_, x, w, p), _lycoris_delta_out(model, module, x, 1.0))
    # As diag-oft: LyCORIS's bypass rotates the bias with the output, its merge does not.
    _close(_kernel_out(boft.add_, x, w, p) + _bias_term(boft, t, model),
           _lycoris_delta_out(model, module, x, 1.0, bypass=True))
    assert boft.bound(boft.prepare(t, -1.3, Rows(), w)[1]) >= float((1.3 * d).abs().max())
    # At other strengths LyCORIS interpolates every stage toward I (a product of interpolations),
    # which is not linear in the strength; ours is. They differ: say so, as a test.
    s = 0.5
    assert not torch.allclose(s * d, module.get_diff_weight(multiplier=s)[0].detach(), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="needs all of them"):
        boft.prepare(t, 1.0, Rows(0, 32), w[:32])


def test_boft_checks_shapes():
    with pytest.raises(ValueError, match="butterfly"):
        boft.delta_shape({"oft_blocks": (4, 12, 5, 5)})  # odd block
    with pytest.raises(ValueError, match="butterfly"):
        boft.delta_shape({"oft_blocks": (3, 3, 4, 4)})  # stage 2 mixes 16 rows of 12


# --- IA3 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3(tmp_path, on_input):
    # create_lycoris passes no train_on_input; LyCORIS sets it per name from a preset (its "ia3"
    # preset does so for "ff.net.2"), so the test writes one.
    preset = tmp_path / "ia3.toml"
    preset.write_text('target_module = []\ntarget_name = ["layer"]\n'
                      f'[name_algo_map.layer]\nalgo = "ia3"\ntrain_on_input = {str(on_input).lower()}\n')
    model, module, t = _network(tmp_path, "ia3", 4, 1.0, 6, preset=str(preset))
    assert sorted(t) == ["on_input", "weight"]
    assert ia3.is_on_input(t) is on_input
    shapes = {k: tuple(v.shape) for k, v in t.items()}
    assert shapes["weight"] == ((IN,) if on_input else (OUT,))
    w, b = model.layer.weight.detach(), model.layer.bias.detach()
    assert ia3.delta_shape(shapes) == (0, 0)
    ia3.check_weight(t, tuple(w.shape))
    with pytest.raises(ValueError, match="IA3 'weight' has"):
        ia3.check_weight(t, (IN, OUT))

    d = ia3.delta(t, w)
    for s in STRENGTHS:
        _close(s * d, module.get_diff_weight(multiplier=s)[0])
    _close(_row_blocks(ia3, t, w), d)
    x, base = _x(), _plain(model)
    _close(ia3.bypass(x, t, w), x @ d.T)
    for s in STRENGTHS:
        ref = _lycoris_delta_out(model, module, x, s)
        kind, p = ia3.prepare(t, s, Rows(), w)
        if on_input:
            assert kind == "ia3_in"
            ours = base(x + ia3.transform(x, p)) - base(x)
        else:
            assert kind == "ia3"
            ours = _kernel_out(ia3.add_, x, w, p)
        _close(ours, ref)
        assert ia3.bound(p) >= float((s * d).abs().max())
        bypass = _lycoris_delta_out(model, module, x, s, bypass=True)
        if on_input:
            _close(ours, bypass)
        else:
            # LyCORIS's bypass scales the bias too: (Wx + b)(1 + s w); its merge does not.
            _close(ours + s * t["weight"] * b, bypass)
    part = ia3.prepare(t, 1.0, Rows(16, 24), w[16:40])
    if on_input:
        assert part is None  # an input transform would touch every row: the dense fallback
    else:
        _close(_kernel_out(ia3.add_, x, w[16:40], part[1]), x @ d[16:40].T)
    assert ia3.dynamic_numel(shapes) == (IN if on_input else OUT)


def test_ia3_on_input_flag_dtypes():
    # save_weights(dtype=None) keeps LyCORIS's int64 buffer; save_weights(dtype=bf16) casts it.
    for dtype in (torch.int64, torch.bfloat16, torch.float32):
        assert ia3.is_on_input({"on_input": torch.tensor(1).to(dtype)})
        assert not ia3.is_on_input({"on_input": torch.tensor(0).to(dtype)})
    assert not ia3.is_on_input({})


# --- Z-Image's widths ---------------------------------------------------------------------------
@pytest.mark.parametrize("out,lora_dim,shape", [
    (3840, 64, (64, 60, 60)),  # attention and w2 rows: factorization(3840, 64) = (60, 64)
    (10240, 4, (2560, 4, 4)),  # feed-forward w1/w3 rows
    (15360, 16, (960, 16, 16)),  # adaLN_modulation rows
])
def test_diag_oft_at_zimage_widths(out, lora_dim, shape):
    from lycoris.functional import diag_oft as lyco_oft
    from lycoris.functional.general import factorization

    b, n = factorization(out, lora_dim)  # DiagOFTModule: block_size, block_num
    assert (n, b, b) == shape
    torch.manual_seed(7)
    w, blocks = torch.randn(out, 16), torch.randn(*shape) * 0.05
    t = {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}
    oft.check_weight({"oft_blocks": shape}, (out, 16))
    _close(oft.delta(t, w), lyco_oft.diff_weight(w, blocks, None, constraint=0.0), 2e-6 * float(w.abs().max()))


@pytest.mark.parametrize("out,lora_dim,shape", [
    (3840, 32, (8, 128, 30, 30)),  # 3840 = 30 * 2^7: blocks of 30 need lora_dim >= 30
    (10240, 16, (11, 1024, 10, 10)),  # 10240 = 10 * 2^10
])
def test_boft_at_zimage_widths(out, lora_dim, shape):
    from lycoris.functional import boft as lyco_boft
    from lycoris.modules.boft import butterfly_factor

    b, n = butterfly_factor(out, lora_dim)  # ButterflyOFTModule: boft_b, block_num; boft_m = log2(n) + 1
    assert (n.bit_length(), n, b, b) == shape
    torch.manual_seed(8)
    w, blocks = torch.randn(out, 8), torch.randn(*shape) * 0.05
    t = {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}
    boft.check_weight({"oft_blocks": shape}, (out, 8))
    _close(boft.delta(t, w), lyco_boft.diff_weight(w, blocks, None, constraint=0.0))


def test_boft_impossible_at_small_lora_dim():
    from lycoris.modules.boft import butterfly_factor

    # No even divisor <= 16 of 3840 leaves a power-of-two cofactor: LyCORIS refuses to write BOFT there.
    with pytest.raises(ValueError, match="impossible"):
        butterfly_factor(3840, 16)
