"""`convert --to comfyui` of LyCORIS OFT and BOFT: the file ComfyUI loads, applied as ComfyUI applies it,
and a warning that carries the measured difference from the trainers' rule (DoRA's too, last test).

ComfyUI's weight update is restated here from its source, independently of the library
(pollockjj/ComfyUI at commit 3cd7b32, `comfy/weight_adapter/oft.py` and `boft.py`, `calculate_weight`;
`comfy/lora.py` `load_lora` hands the file's `.alpha` over as the constraint):
- both: Q = B - B^T; when alpha > 0 and ||Q||_F + 1e-8 > alpha, Q is scaled by alpha / (||Q||_F + 1e-8);
  R = (I + Q)(I - Q)^-1;
- OFT: each block of b rows W_k gains s * (s (R_k - I))^T W_k (strength s twice); `rescale` is loaded
  but not used;
- BOFT: for stage i, the rows in the order of (rows viewed as (-1, 2, k), k = 2^i * b / 2, read as
  (-1, k, 2)) are cut into blocks of b and multiplied by s R + (1 - s) I from the left; then the rows
  are multiplied by `rescale`, and W gains s * (result - W). A missing `.alpha` makes ComfyUI's BOFT
  fail on `None > 0` and skip the module, so every module must carry one.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert_targets import comfyui_key_map, comfyui_load

from zimage_lora import LoRAError, algorithms, load_adapter
from zimage_lora.examples import tiny_model
from zimage_lora.tools.convert import ComfyUIDifferenceWarning, convert_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (module, its stem in ComfyUI's keys, LyCORIS alpha): the small alpha binds (alpha * out far below ||Q||),
# the other does not. A split q keeps its diffusers name (ComfyUI's Lumina2 branch maps it to rows of qkv).
MODULES = (("layers.0.attention.to_q", "layers.0.attention.to_q", 0.05),
           ("layers.1.adaLN_modulation.0", "layers.1.adaLN_modulation.0", 10.0),
           ("context_refiner.0.attention.to_out.0", "context_refiner.0.attention.out", 0.05))
B = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


def _source(model, tmp_path, kind: str, rescale: bool = False):
    """A LyCORIS file (its prefix and network module): diag-oft blocks (n, b, b) or BOFT (2, n, b, b)."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name, _, alpha in MODULES:
        out = model.get_submodule(name).weight.shape[0]
        shape = (out // B, B, B) if kind == "oft" else (2, out // B, B, B)
        stem = "lycoris_" + name.replace(".", "_")
        sd[stem + ".oft_blocks"] = torch.randn(*shape, generator=g) * 0.3
        sd[stem + ".alpha"] = torch.tensor(alpha)
        if rescale:
            sd[stem + ".rescale"] = 1.0 + 0.1 * torch.randn(out, 1, generator=g)
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path


def _cayley(blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    q = blocks.double() - blocks.double().transpose(-1, -2)
    norm = float(torch.norm(q)) + 1e-8
    if alpha > 0 and norm > alpha:
        q = q * alpha / norm
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def comfyui_weight(w: torch.Tensor, keys: dict, s: float) -> torch.Tensor:
    """ComfyUI's patched weight (fp64) for one module's keys (suffix -> tensor) at strength s."""
    w = w.double()
    alpha = float(keys[".alpha"])
    blocks = keys[".oft_blocks"]
    r = _cayley(blocks, alpha)
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    if blocks.ndim == 3:
        n, b, _ = blocks.shape
        step = s * (r - eye)
        diff = torch.stack([step[k].T @ w[k * b:(k + 1) * b] for k in range(n)]).reshape(w.shape)
        return w + s * diff
    m, n, b, _ = blocks.shape
    cur = w.clone()
    for i in range(m):
        k = 2**i * b // 2
        order = torch.arange(w.shape[0]).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
        rot = s * r[i] + (1 - s) * eye
        nxt = torch.empty_like(cur)
        nxt[order] = (rot @ cur[order].reshape(n, b, -1)).reshape(cur.shape)
        cur = nxt
    if ".rescale" in keys:
        cur = cur * keys[".rescale"].double()
    return w + s * (cur - w)


def _convert(src, tmp_path, model, name="c"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ComfyUIDifferenceWarning)
        out = convert_adapter(src, "comfyui", tmp_path / f"{name}.safetensors", model=model)
    lines = [str(c.message) for c in caught if issubclass(c.category, ComfyUIDifferenceWarning)]
    return out, load_file(str(out)), lines


def _keys_of(sd: dict, native: str) -> dict:
    stem = "diffusion_model." + native
    return {k[len(stem):]: v for k, v in sd.items() if k.startswith(stem + ".")}


def _ours(model, src, name: str, w: torch.Tensor) -> torch.Tensor:
    """This library's (LyCORIS's, at strength 1) weight change for `name` of the source, from W = w."""
    t = next(t for t in load_adapter(src, model).targets if t.module == name)
    return algorithms.get(t.algorithm).delta(t.tensors, w).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"at most ([0-9.e+-]+) \(", line)]


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_comfyui_applies_the_converted_file_as_the_trainer_did(model, tmp_path, kind):
    src = _source(model, tmp_path, kind)
    _, sd, lines = _convert(src, tmp_path, model)
    used, patched = comfyui_load(set(sd), comfyui_key_map(model))
    assert set(sd) - used == set() and len(patched) == len(MODULES)
    for name, native, _ in MODULES:
        keys = _keys_of(sd, native)
        assert set(keys) == {".oft_blocks", ".alpha"} and float(keys[".alpha"]) == 0.0
        w = model.get_submodule(name).weight.detach()
        # At strength 1 ComfyUI's patch is the trainer's, also where the constraint binds (alpha 0.05):
        # copying LyCORIS's alpha would have bounded ||Q|| by alpha instead of alpha * out.
        assert _rel(comfyui_weight(w, keys, 1.0) - w.double(), _ours(model, src, name, w)) < 1e-5
    (line,) = lines
    assert ("s^2" in line) == (kind == "oft") and "the same at strength 1" in line
    assert _numbers(line)[0] < 1e-6


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_the_warning_carries_the_measured_difference(model, tmp_path, kind):
    """The number in the warning is ComfyUI's weight change against ours on an identity base weight."""
    src = _source(model, tmp_path, kind, rescale=True)
    _, sd, (line,) = _convert(src, tmp_path, model)
    s = 1.0 if kind == "oft" else 0.5  # OFT: ComfyUI drops rescale at strength 1; BOFT: equal there
    gaps = []
    for name, native, _ in MODULES:
        eye = torch.eye(model.get_submodule(name).weight.shape[0], dtype=torch.float32)
        theirs = comfyui_weight(eye, _keys_of(sd, native), s) - eye.double()
        gaps.append(_rel(theirs, s * _ours(model, src, name, eye)))
    measured = _numbers(line)[-1]
    assert measured == pytest.approx(max(gaps), rel=5e-3) and measured > 0.01
    if kind == "oft":
        assert "ignores OFT's per-row rescale (3 module(s))" in line


def test_the_converted_file_reads_back_the_same(model, tmp_path):
    """Read by this library (ComfyUI's rule for diffusion_model. keys), the file means the source."""
    src = _source(model, tmp_path, "oft", rescale=True)
    out, _, _ = _convert(src, tmp_path, model)
    adapter = load_adapter(out, model)
    # alpha 0 bounds nothing under either rule: no note that ComfyUI's bound and LyCORIS's differ.
    assert not any("ComfyUI's constraint" in n for n in adapter.notes)
    back = {t.module: t for t in adapter.targets}
    for name, _, _ in MODULES:
        w = model.get_submodule(name).weight.detach()
        t = back[name]
        assert _rel(algorithms.get(t.algorithm).delta(t.tensors, w).double(), _ours(model, src, name, w)) < 1e-6


def test_peft_input_rotation_is_refused_with_the_reason(model, tmp_path):
    w = model.layers[0].feed_forward.w1
    src = tmp_path / "peft-boft.safetensors"
    save_file({"transformer.layers.0.feed_forward.w1.boft_R": torch.zeros(1, w.in_features // 4, 4, 4),
               "transformer.layers.0.feed_forward.w1.boft_s": torch.ones(w.out_features, 1)}, str(src))
    with pytest.raises(LoRAError, match=r"boft-input .*PEFT's BOFT rotates its input"):
        convert_adapter(src, "comfyui", tmp_path / "c.safetensors", model=model)


def test_dora_warning_carries_the_difference_measured_on_the_models_weights(model, tmp_path):
    """ComfyUI's DoRA (`comfy/weight_adapter/base.py` `weight_decompose`, 3cd7b32, magnitude per output
    row): m (W + a dW) / (||W||_row + eps32), a = alpha / rank, restated here on the converted file's
    keys; ours is the engine's merged weight of the source (PEFT's and LyCORIS's rule)."""
    import copy

    from test_convert_targets import comfyui_native_params

    from zimage_lora import apply_adapter
    from zimage_lora.examples import make_adapter

    src = make_adapter("peft-dora", tmp_path / "src", model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ComfyUIDifferenceWarning)
        out = convert_adapter(src, "comfyui", tmp_path / "dora.safetensors", model=model)
    (line,) = [str(c.message) for c in caught if "DoRA" in str(c.message)]
    measured = float(re.search(r"\|\|W' - W\|\| at most ([0-9.e+-]+) \(", line).group(1))
    merged = copy.deepcopy(model)
    apply_adapter(merged, src, mode="merged")
    sd, state, after = load_file(str(out)), model.state_dict(), merged.state_dict()
    natives: dict[str, list[str]] = {}
    for diffusers, native in comfyui_native_params(model).items():
        natives.setdefault(native, []).append(diffusers)
    gaps = []
    for native, params in natives.items():
        stem = "diffusion_model." + native.removesuffix(".weight")
        if stem + ".dora_scale" not in sd:
            continue
        w = torch.cat([state[p] for p in params]).double()
        up, down = sd[stem + ".lora_B.weight"].double(), sd[stem + ".lora_A.weight"].double()
        v = w + float(sd[stem + ".alpha"]) / down.shape[0] * (up @ down)
        theirs = sd[stem + ".dora_scale"].double().reshape(-1, 1) * v / (w.norm(dim=1, keepdim=True) + 1.1920929e-07)
        ours = torch.cat([after[p] for p in params]).double()
        # Rows are independent (norms per row): the gap per diffusers module, q, k, v apart.
        for rows in torch.arange(w.shape[0]).chunk(len(params)):
            gaps.append(float((theirs[rows] - ours[rows]).norm() / (ours[rows] - w[rows]).norm()))
    assert len(gaps) > 10 and measured == pytest.approx(max(gaps), rel=1e-3) and measured > 1e-3
