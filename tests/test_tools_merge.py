"""Streaming checkpoint merge: diffusers folders and fused-qkv single files, checked against
independent math on the tensors, each other, and the atomic-write promise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zimage_lora import LoRAError, load_adapter
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model
from zimage_lora.keys.aliases import native_name
from zimage_lora.tools import checkpoint_merge
from zimage_lora.tools.checkpoint_merge import merge_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    model = tiny_model(seed=1)
    folder = root / "transformer"
    model.save_pretrained(folder, max_shard_size="60KB")
    return model, folder, root


def _native_state(model) -> dict[str, torch.Tensor]:
    """The ComfyUI / original layout: native names, q/k/v fused into qkv, with a prefix."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for key in list(sd):
        if ".attention.to_q." in key:
            block = key.split(".attention.to_q.")[0]
            suffix = key.split(".attention.to_q.")[1]
            out[f"{block}.attention.qkv.{suffix}"] = torch.cat(
                [sd.pop(f"{block}.attention.to_{p}.{suffix}") for p in "qkv"], 0
            )
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        module, _, leaf = key.rpartition(".")
        out[f"{native_name(module)}.{leaf}"] = value
    return {"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}


def _reference(model, adapter_file, scale):
    """W + scale * alpha/r * up @ down from the kohya file, by hand (no library code)."""
    sd = load_file(str(adapter_file))
    expected = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    names = {n.replace(".", "_"): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            down, up = sd[key].float(), sd[stem + ".lora_up.weight"].float()
            alpha = float(sd[stem + ".alpha"])
            name = names[stem.removeprefix("lora_unet_")]
            expected[name + ".weight"] += scale * alpha / down.shape[0] * (up @ down)
    return expected


def test_folder_merge_matches_hand_math_and_keeps_layout(base, tmp_path):
    model, folder, _root = base
    lora = make_adapter("kohya", tmp_path / "k.safetensors", model, rank=4, alpha=2.0)
    out = tmp_path / "merged"
    report = merge_checkpoint(folder, [f"{lora}:0.7"], out)
    in_files = sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in out.iterdir()) == in_files
    assert len([n for n in in_files if n.endswith(".safetensors")]) > 1  # really sharded
    expected = _reference(model, lora, 0.7)
    merged = {}
    for f in out.glob("*.safetensors"):
        merged |= load_file(str(f))
    assert merged.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-6)
    assert report.merged_tensors == len(lora_modules(lora)) == 37
    index = json.loads(next(out.glob("*.index.json")).read_text())
    assert set(index["weight_map"]) == set(merged)
    loaded = type(model).from_pretrained(out)  # diffusers reads the written folder
    assert torch.equal(loaded.layers[0].attention.to_q.weight, merged["layers.0.attention.to_q.weight"])


def lora_modules(path):
    return [k for k in load_file(str(path)) if k.endswith(".lora_down.weight")]


def test_single_fused_file_equals_folder_merge(base, tmp_path):
    model, folder, _root = base
    native = tmp_path / "z_native.safetensors"
    save_file(_native_state(model), str(native), metadata={"modelspec.title": "tiny"})
    # A fused LoKr file and a split LoRA on the same checkpoint, stacked.
    lokr = make_adapter("lycoris-lokr-factorized", tmp_path / "lokr.safetensors", model, seed=3)
    lora = make_adapter("kohya", tmp_path / "k.safetensors", model, seed=4)
    dora = make_adapter("lycoris-dora", tmp_path / "d.safetensors", model, seed=5)  # per-row norms on qkv rows
    specs = [f"{lora}:1.3", f"{lokr}:-0.5", f"{dora}:0.6"]
    merge_checkpoint(native, specs, tmp_path / "fused_out.safetensors")
    merge_checkpoint(folder, specs, tmp_path / "split_out.safetensors")
    fused = load_file(str(tmp_path / "fused_out.safetensors"))
    split = load_file(str(tmp_path / "split_out.safetensors"))
    assert fused.keys() == _native_state(model).keys()
    with safe_open(str(tmp_path / "fused_out.safetensors"), "pt") as fh:
        assert fh.metadata()["modelspec.title"] == "tiny"
    resplit = _native_state(_load_into(model, split))
    changed = 0
    for k in fused:
        torch.testing.assert_close(fused[k], resplit[k], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(fused[k], _native_state(model)[k])
    assert changed >= 20


def _load_into(model, sd):
    m = tiny_model(seed=1)
    m.load_state_dict(sd)
    return m


def test_dora_bias_and_dtype(base, tmp_path):
    model, folder, _root = base
    dora = make_adapter("lycoris-dora", tmp_path / "d.safetensors", model, seed=5)
    full = make_adapter("lycoris-full", tmp_path / "f.safetensors", model, seed=6)
    out = tmp_path / "m.safetensors"
    merge_checkpoint(folder, [dora, f"{full}:0.5"], out, dtype="bf16")
    merged = load_file(str(out))
    assert all(v.dtype == torch.bfloat16 for v in merged.values() if v.is_floating_point())
    # DoRA by hand: m * V / ||V|| per row with V = W + alpha/r * up @ down, then the bias diff.
    sd = load_file(str(dora))
    stem = "lycoris_layers_0_feed_forward_w1"
    w = model.state_dict()["layers.0.feed_forward.w1.weight"].float()
    v = w + float(sd[stem + ".alpha"]) / 4 * sd[stem + ".lora_up.weight"] @ sd[stem + ".lora_down.weight"]
    w_dora = sd[stem + ".dora_scale"] * v / v.norm(dim=1, keepdim=True)
    w_full = w_dora + 0.5 * load_file(str(full))[stem + ".diff"]
    assert torch.equal(merged["layers.0.feed_forward.w1.weight"], w_full.to(torch.bfloat16))
    fsd = load_file(str(full))
    b = model.state_dict()["layers.0.adaLN_modulation.0.bias"].float()
    expect_b = (b + 0.5 * fsd["lycoris_layers_0_adaLN_modulation_0.diff_b"]).to(torch.bfloat16)
    assert torch.equal(merged["layers.0.adaLN_modulation.0.bias"], expect_b)


def test_interrupted_merge_leaves_nothing(base, tmp_path, monkeypatch):
    model, folder, _root = base
    lora = make_adapter("kohya", tmp_path / "k.safetensors", model)
    calls = {"n": 0}
    real = checkpoint_merge.merge_weight

    def failing(weight, targets):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(weight, targets)

    monkeypatch.setattr(checkpoint_merge, "merge_weight", failing)
    for out in (tmp_path / "out_dir", tmp_path / "out.safetensors"):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            merge_checkpoint(folder, [lora], out)
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_refuses_scaled_fp8_checkpoint(base, tmp_path):
    model, _folder, _root = base
    sd = _native_state(model)
    sd["model.diffusion_model.layers.0.attention.qkv.scale_weight"] = torch.tensor(1.0)
    path = tmp_path / "scaled.safetensors"
    save_file(sd, str(path))
    lora = make_adapter("kohya", tmp_path / "k.safetensors", model)
    with pytest.raises(LoRAError, match="scaled"):
        merge_checkpoint(path, [lora], tmp_path / "o.safetensors")


def test_refuses_mismatched_adapter_and_existing_out(base, tmp_path):
    model, folder, _root = base
    other = tiny_model(seed=0, dim=96, n_heads=3, n_kv_heads=3)
    bad = make_adapter("kohya", tmp_path / "bad.safetensors", other)
    out = tmp_path / "o.safetensors"
    with pytest.raises(LoRAError, match="shape"):
        merge_checkpoint(folder, [bad], out)
    assert not out.exists()
    out.write_text("x")
    good = make_adapter("kohya", tmp_path / "good.safetensors", model)
    with pytest.raises(LoRAError, match="already exists"):
        merge_checkpoint(folder, [good], out)


def test_cli_merge(base, tmp_path, capsys):
    model, folder, _root = base
    lora = make_adapter("diffusers", tmp_path / "d.safetensors", model)
    sd = load_file(str(lora))
    sd["text_encoder.layers.0.q_proj.lora_A.weight"] = torch.zeros(4, 8)  # reported, not merged
    save_file(sd, str(lora), metadata=safe_open(str(lora), "pt").metadata())
    out = tmp_path / "cli_out"
    assert main(["merge", "--model", str(folder), "--lora", f"{lora}:0.5", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    err = captured.out  # the summary is stdout; nothing goes to stderr on success
    assert captured.err == ""
    assert "changed" in err and "not merged: text_encoder.layers.0.q_proj.lora_A.weight: text-encoder" in err
    adapter = load_adapter(lora, model)
    t = adapter.targets[0]
    merged = {}
    for f in out.glob("*.safetensors"):
        merged |= load_file(str(f))
    w = model.state_dict()[t.module + ".weight"]
    torch.testing.assert_close(merged[t.module + ".weight"], w + 0.5 * t.scale * t.tensors["up"] @ t.tensors["down"])
    assert main(["merge", "--model", str(folder), "--lora", str(lora), "--out", str(out), "--quiet"]) == 1


def test_bf16_merge_matches_the_engine_merged_mode(tmp_path):
    """The streaming merge and the in-memory engine give the same bf16 weights for stacked adapters."""
    from zimage_lora import apply_adapter

    model = tiny_model(seed=7, dtype=torch.bfloat16)
    folder = tmp_path / "bf16"
    model.save_pretrained(folder, max_shard_size="100KB")
    ref = tiny_model(seed=7)
    specs = [
        (make_adapter("lycoris-dora", tmp_path / "a.safetensors", ref, seed=1), 0.8),
        (make_adapter("comfy-fused", tmp_path / "b.safetensors", ref, seed=2), -1.4),
        (make_adapter("lycoris-lokr-tucker", tmp_path / "c.safetensors", ref, seed=3), 2.0),
        (make_adapter("lycoris-full", tmp_path / "d.safetensors", ref, seed=4), 0.5),
    ]
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(folder, [f"{p}:{s}" for p, s in specs], out)
    for i, (p, s) in enumerate(specs):
        apply_adapter(model, p, scale=s, mode="merged", name=f"a{i}")
    merged = load_file(str(out))
    state = model.state_dict()
    assert merged.keys() == state.keys()
    total = same = 0
    for k, v in state.items():
        assert merged[k].dtype == v.dtype == torch.bfloat16
        torch.testing.assert_close(merged[k].float(), v.float(), rtol=1e-2, atol=1e-2)
        total += v.numel()
        same += int((merged[k] == v).sum())
    assert same / total > 0.999


def test_hub_id_is_found_in_the_local_cache_offline(base, tmp_path, monkeypatch):
    """`--model org/name` merges from the Hugging Face cache without the network."""
    from huggingface_hub import constants

    model, _folder, _root = base
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-zimage"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    model.save_pretrained(repo / "snapshots" / rev / "transformer")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    lora = make_adapter("kohya", tmp_path / "k.safetensors", model)
    report = merge_checkpoint("org/tiny-zimage", [lora], tmp_path / "out.safetensors")
    assert report.merged_tensors == 37
    with pytest.raises(LoRAError, match="not in the Hugging Face cache"):
        merge_checkpoint("org/absent", [lora], tmp_path / "out2.safetensors")


def test_overflow_only_in_the_output_dtype_is_refused(tmp_path):
    """fp16 weight + delta finite in fp32 but past fp16's max: the merge must refuse, not write inf."""
    ref = tiny_model(seed=3)
    lora = make_adapter("kohya", tmp_path / "k.safetensors", ref)
    target = load_adapter(lora, ref).targets[0]
    delta = target.scale * (target.tensors["up"].float() @ target.tensors["down"].float())
    flat = int(delta.argmax())
    row, col = divmod(flat, delta.shape[1])
    strength = 1000.0 / float(delta[row, col])  # that entry becomes 65504 + 1000: finite in fp32 only
    model = tiny_model(seed=3, dtype=torch.float16)
    with torch.no_grad():
        model.get_submodule(target.module).weight[row, col] = 65504.0
    folder = tmp_path / "fp16"
    model.save_pretrained(folder)
    out = tmp_path / "merged.safetensors"
    assert 65504.0 + 1000.0 < torch.finfo(torch.float32).max
    with pytest.raises(LoRAError, match="non-finite values"):
        merge_checkpoint(folder, [f"{lora}:{strength}"], out)
    assert not out.exists()


def test_bias_diff_of_the_wrong_length_is_refused_before_writing(base, tmp_path):
    """The bias-fit rule is `shapes.check_bias`, run on the checkpoint's own tensors before any write."""
    from zimage_lora.adapter import Adapter, Target

    model, folder, _root = base
    module = "t_embedder.mlp.0"
    out_f, in_f = model.get_submodule(module).weight.shape
    g = torch.Generator().manual_seed(0)
    target = Target(module=module, algorithm="lora", tensors={
        "down": torch.randn(4, in_f, generator=g), "up": torch.randn(out_f, 4, generator=g),
        "diff_b": torch.randn(out_f - 1, generator=g)})
    adapter = Adapter(name="bad-bias", format="hand-built", source="", targets=[target])
    out = tmp_path / "o.safetensors"
    with pytest.raises(LoRAError, match=rf"bias diff has shape \[{out_f - 1}\], expected \[{out_f}\]"):
        merge_checkpoint(folder, [adapter], out)
    assert not out.exists()
