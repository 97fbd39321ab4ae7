"""The fuzzer's files and properties (for `test_fuzz.py`): hypothesis strategies for structured,
plausible and hostile safetensors files, and the property every file must satisfy (load, then apply in
both modes, or a LoRAError and the model bit-identical)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from _hostile import ITEMSIZE, assert_untouched, frame, state_bits
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from zimage_lora import LoRAError, apply_adapter, examples, load_adapter, remove_adapter
from zimage_lora.formats import grammar
from zimage_lora.keys import ModuleIndex

EXAMPLES = int(os.environ.get("ZIMAGE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

MODEL = examples.tiny_model(seed=0)
INDEX = ModuleIndex(MODEL)
PRISTINE = state_bits(MODEL)
MODULES = sorted(INDEX.dotted)  # dotted names and aliases (qkv, out, x_embedder, ...)
SHAPES = {n: s.shape for n, s in INDEX.shapes.items()}
DIMS = sorted({d for s in SHAPES.values() for d in s} | {0, 1, 2, 3, 4, 8})

PREFIXES = list(grammar.TRANSFORMER_PREFIXES) + ["", "lora_te_", "text_encoder.", "junk."]
SUFFIXES = sorted(grammar._SUFFIXES) + sorted(grammar.UNSUPPORTED_SUFFIXES) + [".weight", ".lora_Z", ""]
DTYPE_NAMES = list(ITEMSIZE) + ["F4", "Q4_K", "", "f32"]
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


pytestmark = pytest.mark.usefixtures("no_network")


# --- strategies ---------------------------------------------------------------------------------------

def _module_name(flat: bool, name: str) -> str:
    return name.replace(".", "_") if flat else name


@st.composite
def keys(draw) -> str:
    prefix = draw(st.sampled_from(PREFIXES))
    name = draw(st.one_of(st.sampled_from(MODULES), st.text(min_size=0, max_size=12)))
    flat = prefix.endswith("_") or draw(st.booleans())
    return prefix + _module_name(flat, name) + draw(st.sampled_from(SUFFIXES))


@st.composite
def shapes_for(draw, key: str) -> list[int]:
    """Mostly shapes that fit the module the key names (so resolution goes deep), sometimes anything."""
    module = next((m for m in MODULES if m in key or m.replace(".", "_") in key), None)
    true = SHAPES.get(module) if module in SHAPES else None
    rank = draw(st.sampled_from([1, 2, 4, 8]))
    if true is not None and len(true) == 2 and draw(st.integers(0, 3)):
        out_f, in_f = true
        if "down" in key or "lora_A" in key or key.endswith("_b"):
            return [rank, in_f]
        if "up" in key or "lora_B" in key or key.endswith("_a"):
            return [out_f, rank]
        if key.endswith((".diff", ".dora_scale", ".lora_magnitude_vector")):
            return [out_f, in_f] if key.endswith(".diff") else [out_f]
        if key.endswith(".diff_b"):
            return [out_f]
        if key.endswith((".alpha", ".lora_alpha")):
            return []
    return draw(st.lists(st.sampled_from(DIMS), min_size=0, max_size=3))


@st.composite
def tensor_specs(draw) -> dict[str, tuple[str, list[int], float]]:
    names = draw(st.lists(keys(), min_size=0, max_size=8, unique=True))
    # Complete LoRA pairs often, so that many files get past grouping into shape checks and loading.
    for name in list(names):
        for a, b in ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight")):
            if name.endswith(a) and draw(st.booleans()):
                names.append(name[: -len(a)] + b)
    specs = {}
    for name in dict.fromkeys(names):
        dtype = draw(st.sampled_from(["F32"] * 6 + ["F16", "BF16"] + DTYPE_NAMES))
        shape = draw(shapes_for(name))
        fill = draw(st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 1e-3, float("nan"), float("inf"), 1e38])))
        specs[name] = (dtype, shape, fill)
    return specs


LINEARS = sorted(n for n, sh in INDEX.shapes.items() if sh.is_linear)
STYLES = [("diffusion_model.", False), ("transformer.", False), ("", False), ("lora_unet_", True),
          ("lycoris_", True), ("base_model.model.", False)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def plausible_specs(draw, mutate: bool = True) -> dict[str, tuple[str, list[int], float]]:
    """Valid adapters for real modules (every algorithm), then 0-2 mutations: most reach resolution."""
    prefix, flat = draw(st.sampled_from(STYLES))
    dtype = draw(st.sampled_from(["F32", "F32", "F16", "BF16"]))
    specs: dict[str, tuple[str, list[int], float]] = {}
    for module in draw(st.lists(st.sampled_from(LINEARS), min_size=1, max_size=4, unique=True)):
        out_f, in_f = SHAPES[module]
        stem = prefix + _module_name(flat, module)
        r = draw(st.sampled_from([1, 2, 4, 8]))
        algo = draw(st.sampled_from(["lora", "lora", "lokr", "loha", "full", "dora"]))
        parts: dict[str, list[int]] = {}
        if algo in ("lora", "dora"):
            down, up = draw(st.sampled_from([(".lora_A.weight", ".lora_B.weight"),
                                             (".lora_down.weight", ".lora_up.weight")]))
            parts = {down: [r, in_f], up: [out_f, r]}
            if algo == "dora":
                parts[".dora_scale"] = [out_f, 1]
        elif algo == "lokr":
            o1 = draw(st.sampled_from(_divisors(out_f)))
            i1 = draw(st.sampled_from(_divisors(in_f)))
            parts = {".lokr_w1": [o1, i1], ".lokr_w2": [out_f // o1, in_f // i1]}
        elif algo == "loha":
            parts = {".hada_w1_a": [out_f, r], ".hada_w1_b": [r, in_f], ".hada_w2_a": [out_f, r],
                     ".hada_w2_b": [r, in_f]}
        else:
            parts = {".diff": [out_f, in_f]}
            if INDEX.shapes[module].bias and draw(st.booleans()):
                parts[".diff_b"] = [out_f]
        if algo != "full" and draw(st.booleans()):
            parts[".alpha"] = []
        fill = draw(st.sampled_from([0.01, -0.02, 0.5]))
        for suffix, shape in parts.items():
            specs[stem + suffix] = ("F32" if suffix == ".alpha" else dtype, shape, fill)
    for _ in range(draw(st.integers(0, 2)) if mutate else 0):
        if not specs:
            break
        key = draw(st.sampled_from(sorted(specs)))
        d, shape, fill = specs[key]
        mutation = draw(st.sampled_from(["dim", "rank", "dtype", "drop", "nan", "junk", "te"]))
        if mutation == "dim" and shape:
            shape = list(shape)
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from(DIMS))
        elif mutation == "rank":
            shape = draw(st.lists(st.sampled_from([1, 2, 4, 64]), max_size=3))
        elif mutation == "dtype":
            d = draw(st.sampled_from(DTYPE_NAMES))
        elif mutation == "drop":
            del specs[key]
            continue
        elif mutation == "nan":
            fill = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        elif mutation == "junk":
            specs[draw(keys())] = (d, draw(shapes_for("")), fill)
        elif mutation == "te":
            specs["lora_te_" + key] = (d, shape, fill)
        specs[key] = (d, shape, fill)
    return specs


@st.composite
def hostile_json(draw) -> str:
    """Config JSON that attacks the parsers: nesting, long numbers, nested regex groups (issue 11 item 5)."""
    depth = draw(st.sampled_from([10, 63, 64, 65, 999, 1001, 5000, 100_000]))
    kind = draw(st.sampled_from(["nest", "number", "pattern"]))
    if kind == "nest":
        return '{"r": 4, "lora_alpha": ' + "[" * depth + "]" * depth + "}"
    if kind == "number":
        return '{"r": 4, "lora_alpha": ' + "7" * min(depth, 5000) + "}"
    group = "(" * min(depth, 5000) + draw(st.sampled_from(["to_q", ".*", "a|b", ""])) + ")" * min(depth, 5000)
    return json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": {group: 2}})


@st.composite
def metadata(draw) -> dict | None:
    if draw(st.integers(0, 3)):
        return None
    meta = {}
    if draw(st.booleans()):
        meta["ss_network_alpha"] = draw(st.sampled_from(["4", "1.5", "nan", "inf", "-1", "x", "1e400", ""]))
    if draw(st.booleans()):
        doc = draw(st.one_of(
            st.just('{"r": 4, "lora_alpha": 8}'),
            st.builds(json.dumps, st.dictionaries(
                st.sampled_from(["r", "lora_alpha", "alpha_pattern", "use_rslora", "transformer", "rank_pattern"]),
                st.one_of(st.integers(-10, 10), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
                          st.dictionaries(st.sampled_from(["to_q", "(", ".*", "layers.0.attention.to_q"]),
                                          st.integers(0, 16), max_size=2)),
                max_size=4)),
            st.text(max_size=30),
            hostile_json(),
        ))
        meta["lora_adapter_metadata"] = doc
    if draw(st.booleans()):
        meta[draw(st.text(max_size=8))] = draw(st.text(max_size=8))
    return meta


def _data(dtype: str, shape: list[int], fill: float) -> bytes:
    count = math.prod(shape)
    if count > 1 << 16:
        return bytes(0)  # the header will claim more than the file holds: a truncated file
    torch_dtype = TORCH_DTYPES.get(dtype)
    if torch_dtype is None:
        return bytes(count * ITEMSIZE.get(dtype, 1))
    # via float32: 1e38 becomes inf in F16, as a real overflowing conversion would
    return torch.full((count,), fill, dtype=torch.float32).to(torch_dtype).view(torch.uint8).numpy().tobytes()


def _header_and_data(specs: dict[str, tuple[str, list[int], float]]) -> tuple[dict, bytearray]:
    header: dict = {}
    data = bytearray()
    for key, (dtype, shape, fill) in specs.items():
        blob = _data(dtype, shape, fill)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    return header, data


@st.composite
def files(draw) -> bytes:
    """A safetensors file, well formed or with one header lie (offsets, length field, dtype size)."""
    specs = draw(st.one_of(plausible_specs(), tensor_specs()))
    header, data = _header_and_data(specs)
    meta = draw(metadata())
    if meta is not None:
        header["__metadata__"] = meta
    lie = draw(st.sampled_from(["none"] * 16 + ["offsets", "length", "truncate", "junk"]))
    if lie == "offsets" and specs:
        key = draw(st.sampled_from(sorted(specs)))
        header[key]["data_offsets"] = draw(st.lists(st.integers(-2, len(data) + 8), min_size=0, max_size=3))
    text = json.dumps(header).encode()
    length = None
    if lie == "length":
        length = draw(st.one_of(st.integers(0, len(text) + 16), st.integers(0, (1 << 64) - 1)))
    blob = frame(text, bytes(data), length)
    if lie == "truncate":
        blob = blob[: draw(st.integers(0, len(blob)))]
    if lie == "junk":
        blob += draw(st.binary(max_size=16))
    return blob


# --- properties ---------------------------------------------------------------------------------------

def _check_adapter(adapter) -> None:
    assert adapter.targets, "success with zero targets"
    for t in adapter.targets:
        assert t.module in INDEX.shapes, t.module
        for v in t.tensors.values():
            assert not v.is_floating_point() or bool(torch.isfinite(v.float()).all())
        assert math.isfinite(t.scale)


def _load_then_apply(path: Path) -> None:
    try:
        adapter = load_adapter(path, MODEL)
    except LoRAError as exc:
        adapter = None
        event(f"load: {type(exc).__name__}")
    else:
        _check_adapter(adapter)
        event("load: success")
    assert_untouched(MODEL, PRISTINE)
    for mode in ("dynamic", "merged"):
        try:
            apply_adapter(MODEL, path, mode=mode, name="fuzz")
        except LoRAError:
            assert_untouched(MODEL, PRISTINE)
            continue
        assert adapter is not None, "the engine applied a file the loader refused"
        remove_adapter(MODEL)
        assert_untouched(MODEL, PRISTINE)


def _with_file(blob: bytes, name: str = "fuzz.safetensors") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(blob)
        _load_then_apply(path)
