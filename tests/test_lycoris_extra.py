"""GLoRA, OFT (diag-oft, BOFT) and IA3 math against LyCORIS 4.1.3's own modules.

Each case builds a LyCORIS network on a one-Linear model with `lycoris.create_lycoris` (the wrapper
kohya-style trainers and SimpleTuner use), fills every trainable tensor with random values (LyCORIS
starts some at zero, which would hide orientation mistakes), saves it with LyCORIS's own
`save_weights` (keys `lycoris_layer.<role>`), reads the file back, and compares our pure functions
with LyCORIS's `get_diff_weight`, its default forward and its bypass forward.
"""

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

from zimage_lora.algorithms import glora, oft  # noqa: E402


# --- GLoRA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_scalar", [False, True])
def test_glora(tmp_path, use_scalar):
    dim, alpha = 4, 3.0
    # use_scalar: LyCORIS saves a2 and b2 multiplied by the trained scalar (custom_state_dict).
    model, module, t = _network(tmp_path, "glora", dim, alpha, 3, fill={"scalar": 0.7}, use_scalar=use_scalar)
    assert sorted(t) == ["a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight"]
    tensors = {k.removesuffix(".weight"): v for k, v in t.items()}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert shapes["a1"] == (IN, dim) and shapes["a2"] == (dim, IN)
    assert shapes["b1"] == (OUT, dim) and shapes["b2"] == (dim, IN)
    w = model.layer.weight.detach()
    assert glora.delta_shape(shapes) == (OUT, IN)
    scale = float(tensors["alpha"]) / glora.rank(shapes)
    assert scale == alpha / dim

    d = glora.delta(tensors, w)
    for s in STRENGTHS:
        _close(s * scale * d, module.get_diff_weight(multiplier=s)[0])
    _close(_row_blocks(glora, tensors, w), d)
    x = _x()
    _close(glora.bypass(x, tensors, w), x @ d.T)

    base = _plain(model)
    for s in STRENGTHS:
        ref = _lycoris_delta_out(model, module, x, s)
        _close(ref, _lycoris_delta_out(model, module, x, s, bypass=True))
        # The rank-2r LoRA fold, computed here with plain matmuls (LoRA's kernel is x @ down^T @ up^T).
        kind, p = glora.prepare(tensors, s * scale, Rows(), w)
        assert kind == "lora" and p["down"].shape == (2 * dim, IN) and p["up"].shape == (OUT, 2 * dim)
        _close((x @ p["down"].T) @ p["up"].T, ref)
        # The input-transform form: base(x + g(x)) + the b-half.
        q = glora.prepare_transform(tensors, s * scale)
        rows = torch.zeros(x.shape[:-1] + (OUT,))
        glora.add_b_(rows, x, None, q, 1.0)
        _close(base(x + glora.transform(x, q)) + rows - base(x), ref)
    # A placement of rows [16, 40): the fold takes W's rows and b1's rows.
    kind, p = glora.prepare(tensors, scale, Rows(16, 24), w[16:40])
    _close((x @ p["down"].T) @ p["up"].T, scale * x @ d[16:40].T)
    assert glora.dynamic_numel(shapes) == 2 * dim * (IN + OUT)
    assert glora.describe(shapes) == "W @ 48x4 @ 4x48 + 64x4 @ 4x48"


def test_glora_checks_shapes():
    shapes = {"a1": (IN, 4), "a2": (4, IN), "b1": (OUT, 4), "b2": (3, IN)}
    with pytest.raises(ValueError, match="ranks disagree"):
        glora.delta_shape(shapes)
    shapes["b2"] = (4, IN + 1)
    with pytest.raises(ValueError, match="input widths disagree"):
        glora.delta_shape(shapes)
    with pytest.raises(ValueError, match="base weight"):
        glora.delta({k: torch.zeros(v) for k, v in shapes.items()})


# --- diag-oft -----------------------------------------------------------------------------------


@pytest.mark.parametrize("constraint,rescaled", OFT_CASES)
def test_diag_oft(tmp_path, constraint, rescaled):
    dim = 8  # factorization(64, 8): 8 blocks of 8 rows
    model, module, t = _network(tmp_path, "diag-oft", dim, 1.0, 4, constraint=constraint, rescaled=rescaled)
    assert sorted(t) == ["alpha", "oft_blocks"] + (["rescale"] if rescaled else [])
    assert float(t["alpha"]) == pytest.approx(constraint)  # alpha holds the constraint, not a scale
    shapes = {k: tuple(v.shape) for k, v in t.items()}
    assert shapes["oft_blocks"] == (8, 8, 8)
    if rescaled:
        assert shapes["rescale"] == (OUT, 1)
    w = model.layer.weight.detach()
    assert oft.delta_shape(shapes) == (OUT, 0)
    oft.check_weight(shapes, tuple(w.shape))
    assert oft.rank(shapes) is None and oft.row_align(t) == 8
    if constraint == 1e-4:  # the bound binds: ||Q|| is far above 1e-4 * 64
        q = t["oft_blocks"] - t["oft_blocks"].transpose(1, 2)
        assert float(q.norm()) > oft.constraint(t) > 0

    # LyCORIS forms R in fp32 and subtracts W afterwards, so its delta carries ~eps32 * |W| of
    # absolute error (visible when the constraint makes R nearly I); ours keeps R - I in fp64.
    tol = 2e-6 * float(w.abs().max())
    d = oft.delta(t, w)
    _close(d, module.get_diff_weight(multiplier=1.0)[0], tol)
    _close(_row_blocks(oft, t, w), d)
    x = _x()
    _close(oft.bypass(x, t, w), x @ d.T, tol)
    for s in STRENGTHS:
        ref = _lycoris_delta_out(model, module, x, s)
        if rescaled and s != 1.0:
            # LyCORIS's multiplier scales only the rotation: W' = rescale * (I + s (R - I))^T W, so its
            # delta is s * delta + (1 - s) * (rescale - 1) * W, not linear in s. (Its get_diff_weight
            # fails here in 4.1.3, a broadcast of (out, 1) against (blocks, b, in); its forward works.)
            lyco = s * d + (1 - s) * (t["rescale"] - 1) * w
            _close(torch.nn.functional.linear(x, lyco), ref, tol)
            continue
        _close(s * d, module.get_diff_weight(multiplier=s)[0], tol)
        kind, p = oft.prepare(t, s, Rows(), w)
        assert kind == "oft"
        _close(_kernel_out(oft.add_, x, w, p), ref, tol)
        _close(_kernel_out(oft.add_, x, w, oft.prepare(t, 1.0, Rows(), w)[1], alpha=s), ref, tol)
        assert oft.bound(p) >= float((s * d).abs().max())
        if s == 1.0:
            # LyCORIS's bypass rotates the base output *with* its bias; its merge leaves the bias alone.
            bypass = _lycoris_delta_out(model, module, x, s, bypass=True)
            _close(_kernel_out(oft.add_, x, w, p) + _bias_term(oft, t, model), bypass, tol)
    # A placement of whole blocks (rows [8, 24)) takes those blocks and W's rows only.
    _close(_kernel_out(oft.add_, x, w[8:24], oft.prepare(t, 1.0, Rows(8, 16), w[8:24])[1]), x @ d[8:24].T, tol)
    with pytest.raises(ValueError, match="cut its blocks"):
        oft.prepare(t, 1.0, Rows(4, 16), w[4:20])
    assert oft.dynamic_numel(shapes) == 8 * 8 * 8 + OUT * (2 if rescaled else 1)


def test_diag_oft_checks():
    shapes = {"oft_blocks": (16, 4, 4)}
    with pytest.raises(ValueError, match="cover 64 rows, the weight has 60"):
        oft.check_weight(shapes, (60, IN))
    with pytest.raises(ValueError, match="square blocks"):
        oft.delta_shape({"oft_blocks": (16, 4, 3)})
    with pytest.raises(ValueError, match="one value per output row"):
        oft.delta_shape({**shapes, "rescale": (60, 1)})
