"""GLoRA, OFT (diag-oft, BOFT) and IA3 math against LyCORIS 4.1.3's own modules.

Each case builds a LyCORIS network on a one-Linear model with `lycoris.create_lycoris` (the wrapper
kohya-style trainers and SimpleTuner use), fills every trainable tensor with random values (LyCORIS
starts some at zero, which would hide orientation mistakes), saves it with LyCORIS's own
`save_weights` (keys `lycoris_layer.<role>`), reads the file back, and compares our pure functions
with LyCORIS's `get_diff_weight`, its default forward and its bypass forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

lycoris = pytest.importorskip("lycoris", reason="LyCORIS is not installed (pip install lycoris-lora)")

from zimage_lora.algorithms import boft, glora, ia3, oft  # noqa: E402

logging.getLogger("lycoris").setLevel(logging.ERROR)
OUT, IN = 64, 48
PREFIX = "lycoris_layer."  # LycorisNetwork.LORA_PREFIX + "_" + the module's path with "." -> "_"
STRENGTHS = (1.0, 0.5, -1.3)


class OneLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(IN, OUT, bias=True)


@pytest.fixture(autouse=True)
def _keep_presets(monkeypatch):
    """LyCORIS presets set class attributes of LycorisNetwork; put them back after each test."""
    for name in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(lycoris.LycorisNetwork, name, getattr(lycoris.LycorisNetwork, name))


def _network(tmp_path, algo: str, dim: int, alpha: float, seed: int, fill=None, **kwargs):
    """(model, LyCORIS module, file tensors with the prefix stripped)."""
    torch.manual_seed(seed)
    model = OneLinear()
    with torch.no_grad():
        model.layer.weight.normal_(0, 0.5)
        model.layer.bias.normal_(0, 0.5)
    net = lycoris.create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, **kwargs)
    net.apply_to()
    assert len(net.loras) == 1
    module = net.loras[0]
    with torch.no_grad():
        for name, p in module.named_parameters():
            if fill is not None and name in fill:
                p.fill_(fill[name])
            else:
                p.normal_(0, 0.3)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, None)
    saved = load_file(str(path))
    assert all(k.startswith(PREFIX) for k in saved), sorted(saved)
    return model, module, {k[len(PREFIX) :]: v for k, v in saved.items()}


def _close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 0.0) -> None:
    ref = ref.detach().float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=max(atol, 1e-5 * float(ref.abs().max())))


def _lycoris_delta_out(model, module, x: torch.Tensor, strength: float, bypass: bool = False) -> torch.Tensor:
    """LyCORIS's forward at `strength` minus the plain layer's output."""
    w, b = model.layer.weight, model.layer.bias
    with torch.no_grad():
        module.multiplier = strength
        y = module.bypass_forward(x, strength) if bypass else model.layer(x)
        return y - torch.nn.functional.linear(x, w, b)


def _plain(model):
    """The layer's own forward: after `apply_to`, `model.layer(x)` runs LyCORIS's wrapper instead."""
    w, b = model.layer.weight.detach(), model.layer.bias.detach()
    return lambda x: torch.nn.functional.linear(x, w, b)


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Rows:
    """The part of `zimage_lora.placement.Placement` that `prepare` reads: delta rows [d0, d0 + n)."""

    d0: int = 0
    n: int = OUT

    @property
    def whole(self) -> bool:
        return self.d0 == 0 and self.n == OUT


def _row_blocks(mod, tensors, weight: torch.Tensor) -> torch.Tensor:
    """The delta a row block at a time, each block from the same rows of W (cuts at `row_align`)."""
    align = mod.row_align(tensors) if hasattr(mod, "row_align") else 1
    cuts = sorted({min(OUT, c * align) for c in (0, 1, 3, 5)} | {OUT}) if align < OUT else [0, OUT]
    if align == 1:
        cuts = [0, 7, 20, 41, OUT]
    parts = mod.row_parts(tensors)
    pieces = [mod.delta_block(parts, lo, hi, weight=weight[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]
    return torch.cat(pieces)


def _kernel_out(add_, x, w, t, alpha: float = 1.0) -> torch.Tensor:
    """What a `uses_wx` kernel adds to zero rows, with wx = x @ W_rows^T (no bias)."""
    x2 = x.reshape(-1, IN)
    wx = x2 @ w.T
    rows = torch.zeros_like(wx)
    add_(rows, x2, wx, t, alpha)
    return rows.reshape(*x.shape[:-1], w.shape[0])


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
OFT_CASES = [(0.0, False), (0.0, True), (0.05, False), (0.05, True), (1e-4, False)]


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


def _bias_term(mod, t, model) -> torch.Tensor:
    """What LyCORIS's bypass adds on top of the merge: the rotation of the bias, delta(b) for W = b."""
    b = model.layer.bias.detach()
    return mod.delta(t, b.reshape(-1, 1)).reshape(-1)


def test_diag_oft_checks():
    shapes = {"oft_blocks": (16, 4, 4)}
    with pytest.raises(ValueError, match="cover 64 rows, the weight has 60"):
        oft.check_weight(shapes, (60, IN))
    with pytest.raises(ValueError, match="square blocks"):
        oft.delta_shape({"oft_blocks": (16, 4, 3)})
    with pytest.raises(ValueError, match="one value per output row"):
        oft.delta_shape({**shapes, "rescale": (60, 1)})


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
