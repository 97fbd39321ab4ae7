"""convert targets named by the applications that load them; every ComfyUI target loses no key.

ComfyUI's key map for Z-Image is rebuilt here from its rules as data, independently of
`tools/loaders.py`. Provenance: pollockjj/ComfyUI at commit 3cd7b32 (ComfyUI v0.8.0 + 1):
- `comfy/utils.py` `z_image_to_diffusers`: diffusers parameter -> native parameter (q/k/v -> row
  slices of `attention.qkv`; the per-block map; the basic map of embedders and the final layer);
- `comfy/lora.py` `model_lora_keys_unet`: for each native `diffusion_model.X.weight`, the stems
  `lora_unet_` + X with '_' for '.', and `diffusion_model.X`; for Lumina2 (Z-Image) models, each
  diffusers `D.weight` of the map also as `diffusion_model.D`, `transformer.D`, `lycoris_` + flat(D);
- `comfy/lora.py` `load_lora` and `comfy/weight_adapter/{lora,loha,lokr,glora,oft,boft}.py`: the
  keys each stem consumes (anything else is logged "lora key not loaded" and skipped).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_lora import LoRAError, load_adapter
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model
from zimage_lora.tools import loaders
from zimage_lora.tools.convert import ComfyUIDifferenceWarning, convert_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- comfy/utils.py z_image_to_diffusers (3cd7b32), as data ------------------------------------------------
BLOCK_MAP = {  # per block: diffusers -> native (the to_q/k/v rule is QKV below)
    "attention.norm_q.weight": "attention.q_norm.weight", "attention.norm_k.weight": "attention.k_norm.weight",
    "attention.to_out.0.weight": "attention.out.weight", "attention.to_out.0.bias": "attention.out.bias",
    "attention_norm1.weight": "attention_norm1.weight", "attention_norm2.weight": "attention_norm2.weight",
    "feed_forward.w1.weight": "feed_forward.w1.weight", "feed_forward.w2.weight": "feed_forward.w2.weight",
    "feed_forward.w3.weight": "feed_forward.w3.weight", "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
    "adaLN_modulation.0.weight": "adaLN_modulation.0.weight", "adaLN_modulation.0.bias": "adaLN_modulation.0.bias",
}
QKV = {"attention.to_q": 0, "attention.to_k": 1, "attention.to_v": 2}  # row thirds of attention.qkv
BASIC = {  # diffusers -> native
    "all_final_layer.2-1.linear.weight": "final_layer.linear.weight",
    "all_final_layer.2-1.linear.bias": "final_layer.linear.bias",
    "all_final_layer.2-1.adaLN_modulation.1.weight": "final_layer.adaLN_modulation.1.weight",
    "all_final_layer.2-1.adaLN_modulation.1.bias": "final_layer.adaLN_modulation.1.bias",
    "all_x_embedder.2-1.weight": "x_embedder.weight", "all_x_embedder.2-1.bias": "x_embedder.bias",
    "cap_embedder.0.weight": "cap_embedder.0.weight", "cap_embedder.1.weight": "cap_embedder.1.weight",
    "cap_embedder.1.bias": "cap_embedder.1.bias", "t_embedder.mlp.0.weight": "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias": "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight": "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias": "t_embedder.mlp.2.bias",
}
BLOCKS = ("layers", "context_refiner", "noise_refiner")

# -- comfy/weight_adapter/*.py load() and comfy/lora.py load_lora (3cd7b32): what a stem consumes -------------
LORA_UP_DOWN = [  # (up, down, mid or None), tried in this order; the first up present wins
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"), ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None), (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
]
LOHA = [".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"]  # + t1, t2 when t1 is present
LOKR = [".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"]
GLORA = [".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"]
ALWAYS = [".alpha", ".dora_scale", ".diff", ".diff_b", ".set_weight"]


def comfyui_native_params(model: torch.nn.Module) -> dict[str, str]:
    """z_image_to_diffusers over the model's own diffusers parameters: diffusers -> native parameter."""
    out = {}
    for name, _ in model.named_parameters():
        head = name.split(".", 2)
        if head[0] in BLOCKS:
            block, rest = ".".join(head[:2]), head[2]
            module, end = rest.rsplit(".", 1)
            if module in QKV:
                out[name] = f"{block}.attention.qkv.{end}"
            elif rest in BLOCK_MAP:
                out[name] = f"{block}.{BLOCK_MAP[rest]}"
        elif name in BASIC:
            out[name] = BASIC[name]
    return out


def comfyui_key_map(model: torch.nn.Module) -> dict[str, str]:
    """model_lora_keys_unet for a Lumina2 (Z-Image) model: stem -> native weight it patches."""
    params = comfyui_native_params(model)
    key_map = {}
    for native in set(params.values()):  # the native model's state dict ("diffusion_model." + native)
        if native.endswith(".weight"):
            stem = native[: -len(".weight")]
            key_map["lora_unet_" + stem.replace(".", "_")] = native
            key_map["diffusion_model." + stem] = native
    for diffusers, native in params.items():  # the Lumina2 branch
        if diffusers.endswith(".weight"):
            stem = diffusers[: -len(".weight")]
            for k in ("diffusion_model." + stem, "transformer." + stem, "lycoris_" + stem.replace(".", "_")):
                key_map[k] = native
    return key_map


def comfyui_load(keys: set[str], key_map: dict[str, str]) -> tuple[set[str], set[str]]:
    """load_lora: (keys ComfyUI uses, native weights it patches)."""
    used, patched = set(), set()
    for x, native in key_map.items():
        hit = {x + s for s in ALWAYS} & keys
        for up, down, mid in LORA_UP_DOWN:
            if x + up in keys:
                hit |= {x + up, x + down} | ({x + mid} & keys if mid else set())
                break
        if x + LOHA[0] in keys:
            hit |= {x + s for s in LOHA} | ({x + ".hada_t1", x + ".hada_t2"} if x + ".hada_t1" in keys else set())
        hit |= {x + s for s in LOKR} & keys
        if x + GLORA[0] in keys:
            hit |= {x + s for s in GLORA}
        if x + ".oft_blocks" in keys:
            hit |= {x + ".oft_blocks"} | ({x + ".rescale"} & keys)
        if hit - {x + ".alpha"}:
            patched.add(native)
        used |= hit
    return used, patched


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


def _written(model, tmp_path, layout, to):
    tmp_path.mkdir(exist_ok=True)
    src = make_adapter(layout, tmp_path / ("src" if layout.startswith("peft") else "src.safetensors"), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ComfyUIDifferenceWarning)
        out = convert_adapter(src, to, tmp_path / f"{to}.safetensors", model=model)
    return load_adapter(src, model), set(load_file(str(out)))


SOURCES = ["kohya", "kohya-fused", "comfy-fused", "musubi-other", "peft", "peft-dora", "mixed", "lycoris-dora",
           "lycoris-lokr-factorized", "lycoris-loha", "lycoris-full", "ai-toolkit-lokr", "diffusers"]


@pytest.mark.parametrize("to", ["comfyui", "kohya-comfyui", "comfy"])
@pytest.mark.parametrize("layout", SOURCES)
def test_every_comfyui_target_loses_no_key_in_comfyui(model, tmp_path, layout, to):
    if to == "kohya-comfyui" and layout in ("lycoris-lokr-factorized", "lycoris-loha", "ai-toolkit-lokr"):
        # LoKr and LoHa on q/k/v cannot be fused: ComfyUI's kohya spelling cannot name them.
        with pytest.raises(LoRAError, match=r"ComfyUI would not load .*attention_to_.*Convert to 'comfyui'"):
            _written(model, tmp_path, layout, to)
        return
    adapter, keys = _written(model, tmp_path, layout, to)
    key_map = comfyui_key_map(model)
    used, patched = comfyui_load(keys, key_map)
    assert keys - used == set()
    # ... and every module the adapter changes is patched in ComfyUI's model (q/k/v: the fused qkv).
    params = comfyui_native_params(model)
    expected = {params[m + ".weight"] for m in adapter.modules}
    assert patched == expected


def test_today_kohya_output_is_what_comfyui_drops_and_the_checker_agrees(model, tmp_path):
    """The map has teeth: the musubi/kohya spelling (diffusers names) loses modules in ComfyUI, and
    the library's own ComfyUI rules name exactly the keys this reference drops."""
    _, keys = _written(model, tmp_path, "kohya", "kohya")
    used, _ = comfyui_load(keys, comfyui_key_map(model))
    lost = keys - used
    assert any("attention_to_q" in k for k in lost) and any("all_x_embedder" in k for k in lost)
    modules = {n: m for n, m in model.named_modules() if n}
    assert set(loaders.dropped(loaders.LOADERS["comfyui"], keys, modules)) == lost


def test_a_module_comfyui_would_drop_is_an_error_naming_it(model, tmp_path):
    """q/k/v with a DoRA magnitude per input column cannot be fused: the kohya spelling of their split
    names is not in ComfyUI's map, so --to kohya-comfyui refuses and writes nothing."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for p in ("q", "k", "v"):
        stem = f"lora_unet_layers_0_attention_to_{p}"
        sd[stem + ".lora_down.weight"] = torch.randn(4, 64, generator=g) / 8
        sd[stem + ".lora_up.weight"] = torch.randn(64, 4, generator=g) / 8
        sd[stem + ".alpha"] = torch.tensor(4.0)
        sd[stem + ".dora_scale"] = torch.rand(1, 64, generator=g) + 0.5
    src = tmp_path / "dora_in.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "x.safetensors"
    lost = r"ComfyUI would not load 12 key\(s\).*module\(s\) 'lora_unet_layers_0_attention_to_k'"
    with pytest.raises(LoRAError, match=lost):
        convert_adapter(src, "kohya-comfyui", out, model=model)
    assert not out.exists()
    # The comfyui spelling can say q, k and v apart (diffusion_model.<diffusers name> is in the map).
    convert_adapter(src, "comfyui", out, model=model)
    used, _ = comfyui_load(set(load_file(str(out))), comfyui_key_map(model))
    assert set(load_file(str(out))) == used


def test_targets_for_the_other_applications(model, tmp_path):
    adapter, keys = _written(model, tmp_path, "kohya", "musubi")
    assert all(k.startswith("lora_unet_") for k in keys) and any("attention_to_out_0" in k for k in keys)
    _, keys = _written(model, tmp_path, "kohya", "ai-toolkit")
    assert all(k.startswith("diffusion_model.") and ".lora_" in k for k in keys)
    assert not any(k.endswith(".alpha") for k in keys)  # ai-toolkit's LoRA files carry no alpha
    _, keys = _written(model, tmp_path / "lokr", "lycoris-lokr-factorized", "ai-toolkit")
    assert any(k.endswith(".lokr_w1") for k in keys) and any(k.endswith(".alpha") for k in keys)


def test_help_names_the_applications(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    for word in ("comfyui", "kohya-comfyui", "musubi", "ai-toolkit", "SwarmUI", "Forge", "musubi-tuner",
                 "PeftModel.from_pretrained", "comfy = comfyui"):
        assert word in text


def test_comfyui_refuses_ia3_with_the_reason(model, tmp_path):
    sd = {"lora_unet_layers_0_feed_forward_w1.weight": torch.rand(tiny_model().layers[0].feed_forward.w1.out_features),
          "lora_unet_layers_0_feed_forward_w1.on_input": torch.tensor(0)}
    src = tmp_path / "ia3.safetensors"
    save_file(sd, str(src))
    for to in ("comfyui", "kohya-comfyui"):
        with pytest.raises(LoRAError, match=r"--to " + to + r" holds .*adapter has ia3 .*ComfyUI has no IA3 adapter"):
            convert_adapter(src, to, tmp_path / f"{to}.safetensors", model=model)
        assert not (tmp_path / f"{to}.safetensors").exists()


def test_comfyui_differences_are_warned_on_convert_and_noted_by_inspect(model, tmp_path, capsys):
    import json

    from zimage_lora.adapter import Dora
    from zimage_lora.examples import TINY_CONFIG
    from zimage_lora.tools.targets import comfyui_differences

    src = make_adapter("peft-dora", tmp_path / "src", model)
    with pytest.warns(ComfyUIDifferenceWarning, match=r"DoRA .* per output row .*\|\|W \+ dW\|\| / \|\|W\|\|"):
        out = convert_adapter(src, "comfyui", tmp_path / "c.safetensors", model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ComfyUIDifferenceWarning)  # the diffusers target has no such difference
        convert_adapter(src, "diffusers", tmp_path / "d.safetensors", model=model)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    assert main(["inspect", str(out), "--model", str(cfg), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith("in ComfyUI, DoRA with a magnitude per output row") for n in notes)
    # OFT at strength s acts as s^2 in ComfyUI; BOFT follows a third convention; a per-input DoRA is the same.
    lines = comfyui_differences([("a", "oft", None, None), ("b", "boft", None, None),
                                 ("c", "lora", Dora(torch.ones(1, 4), on_out=False), None)])
    assert len(lines) == 2 and "s^2" in lines[0] and "BOFT" in lines[1]


@pytest.mark.parametrize("to", ["comfyui", "musubi", "ai-toolkit"])
def test_arithmetic_outputs_take_the_same_targets(model, tmp_path, to):
    """`combine`/`resize`/`extract` write through convert's targets: application names work there too."""
    from zimage_lora.arithmetic.common import save

    adapter = load_adapter(make_adapter("kohya", tmp_path / "k.safetensors", model), model)
    keys = set(load_file(str(save(adapter, tmp_path / "o.safetensors", to=to))))
    if to == "comfyui":
        assert keys - comfyui_load(keys, comfyui_key_map(model))[0] == set()
    assert sorted(load_adapter(tmp_path / "o.safetensors", model).modules) == sorted(adapter.modules)
