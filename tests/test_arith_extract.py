"""`extract`: a planted low-rank difference recovered to its rank and error, randomized SVD against
the exact one, fused single files, --diffs, refusals naming the key, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora import LoRAError, apply_adapter, load_adapter
from zimage_lora.arithmetic import extract, lowrank, ranks, save
from zimage_lora.arithmetic.extract import extract_report
from zimage_lora.cli import main
from zimage_lora.examples import linear_names, tiny_model
from zimage_lora.keys.aliases import native_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted(model, rank: int, seed: int, noise: float = 0.0) -> torch.nn.Module:
    """model + a rank-`rank` difference (singular values 1, 1/2, 1/4, ...) on every Linear, + noise."""
    g = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name in linear_names(tuned):
            w = tuned.get_submodule(name).weight
            u = torch.linalg.qr(torch.randn(w.shape[0], rank, generator=g))[0]
            v = torch.linalg.qr(torch.randn(w.shape[1], rank, generator=g))[0]
            s = 0.5 ** torch.arange(rank, dtype=torch.float32)
            w += (u * s) @ v.T + noise * torch.randn(w.shape, generator=g)
    return tuned


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = tiny_model(seed=1)
    tuned = _planted(base, 3, seed=2)
    base.save_pretrained(root / "base", max_shard_size="60KB")
    tuned.save_pretrained(root / "tuned", max_shard_size="60KB")
    return base, tuned, root / "base", root / "tuned"


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_planted_low_rank_difference_is_recovered_to_its_rank(pair):
    base, tuned, b, t = pair
    adapter, report = extract_report(b, t, energy=0.999999)
    assert {m["rank"] for m in report.modules} == {3} and len(report.modules) == len(linear_names(base))
    assert report.error < 1e-4
    m = copy.deepcopy(base)
    apply_adapter(m, adapter, mode="merged")
    for k, v in _weights(tuned).items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-5, msg=k)
    # Fewer: the error is what the dropped singular values say (1/4 of a 1, 1/2, 1/4 spectrum)
    _, two = extract_report(b, t, rank=2)
    expected = 0.25 / (1 + 0.25 + 0.0625) ** 0.5
    assert all(m["error"] == pytest.approx(expected, rel=1e-3) for m in two.modules)


@pytest.mark.parametrize("rule", [dict(rank=8), dict(energy=0.9), dict(energy=0.99, rank=40)])
def test_randomized_svd_matches_the_exact_one(rule):
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 120, generator=g))[0]
    v = torch.linalg.qr(torch.randn(260, 120, generator=g))[0]
    s = 0.9 ** torch.arange(120, dtype=torch.float32)
    delta = (u * s) @ v.T
    r = ranks.rule(**rule)
    fast, exact = lowrank.randomized(delta, r), lowrank.from_dense(delta, r)
    assert fast.rank == exact.rank
    # the exact error of the factors found, ||D - up down||, within 1% of the optimum
    found = float((delta - fast.up @ fast.down).norm() / delta.norm())
    assert found == pytest.approx(exact.rel_error, rel=1e-2)
    assert fast.rel_error == pytest.approx(found, rel=1e-3, abs=1e-5)


def _native_file(model, path) -> None:
    """The ComfyUI single-file layout: native names, q/k/v fused into qkv, a prefix."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for key in list(sd):
        if ".attention.to_q." in key:
            block, leaf = key.split(".attention.to_q.")
            out[f"{block}.attention.qkv.{leaf}"] = torch.cat([sd[f"{block}.attention.to_{p}.{leaf}"] for p in "qkv"])
    for key, value in sd.items():
        if any(f".attention.to_{p}." in key for p in "qkv"):
            continue
        module, _, leaf = key.rpartition(".")
        out[f"{native_name(module)}.{leaf}"] = value
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}, str(path))


def test_fused_single_files_give_split_diffusers_targets_and_diffs(pair, tmp_path):
    base, tuned, _b, _t = pair
    tuned = copy.deepcopy(tuned)
    with torch.no_grad():
        tuned.layers[0].attention.norm_q.weight += 0.1
        tuned.t_embedder.mlp[0].bias += 0.05
    _native_file(base, tmp_path / "base.safetensors")
    _native_file(tuned, tmp_path / "tuned.safetensors")
    adapter, report = extract_report(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                                     energy=0.999999, diffs=True)
    # q, k and v each got their own rank-3 difference: the fused qkv one has rank 9
    assert {m["rank"] for m in report.modules if m["module"].endswith("qkv")} == {9}
    names = {t.module for t in adapter.targets}
    assert {"layers.0.attention.to_q", "layers.0.attention.to_out.0", "layers.0.attention.norm_q"} <= names
    out = save(adapter, tmp_path / "x.safetensors", to="comfy")
    m = copy.deepcopy(base)
    apply_adapter(m, load_adapter(out, base), mode="merged")
    for k, v in _weights(tuned).items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-5, msg=k)
    _, without = extract_report(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=3)
    assert any("q_norm.weight' differs but is not a Linear weight (see --diffs)" in n for n in without.notes)


def test_streams_one_tensor_pair_at_a_time(pair, monkeypatch):
    """Memory: every tensor read is gone before the next pair is read (at most the base tensor of the
    current pair is alive when its tuned partner is read)."""
    import importlib
    import weakref

    module = importlib.import_module("zimage_lora.arithmetic.extract")  # the package exports the function

    _base, _tuned, b, t = pair
    alive: list[weakref.ref] = []
    most = []
    read = module._read

    def counting(*args):
        most.append(sum(r() is not None for r in alive))
        tensor = read(*args)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(module, "_read", counting)
    extract(b, t, rank=3)
    assert len(most) > 100 and max(most) <= 1


def test_refusals_name_the_key(pair, tmp_path):
    base, _tuned, b, t = pair
    other = tiny_model(seed=1, n_layers=3)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(LoRAError, match=r"config field 'n_layers' is 3, but .* has 2"):
        extract(b, tmp_path / "other", rank=2)
    sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    save_file(sd, str(tmp_path / "a.safetensors"))
    sd2 = dict(sd)
    sd2["layers.0.feed_forward.w1.weight"] = torch.zeros(3, 3)
    save_file(sd2, str(tmp_path / "b.safetensors"))
    with pytest.raises(LoRAError, match=r"'layers\.0\.feed_forward\.w1\.weight' is F32 \[3, 3\], but .* \[\d+, 64\]"):
        extract(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rank=2)
    del sd2["layers.0.feed_forward.w1.weight"]
    save_file(sd2, str(tmp_path / "c.safetensors"))
    with pytest.raises(LoRAError, match=r"c\.safetensors: has no tensor 'layers\.0\.feed_forward\.w1\.weight'"):
        extract(tmp_path / "a.safetensors", tmp_path / "c.safetensors", rank=2)
    with pytest.raises(LoRAError, match="no weight differs"):
        extract(tmp_path / "a.safetensors", tmp_path / "a.safetensors", rank=2)
    with pytest.raises(LoRAError, match="extract needs --rank R or --energy E"):
        extract(b, t)


def test_cli_extract(pair, tmp_path, capsys):
    base, _tuned, b, t = pair
    out = tmp_path / "x.safetensors"
    assert main(["extract", "--base", str(b), "--tuned", str(t), "--rank", "3", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"] < 1e-4 and {m["rank"] for m in doc["modules"]} == {3}
    assert len(load_adapter(out, base).targets) == len(linear_names(base))
