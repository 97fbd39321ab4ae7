"""JSON and patterns from files: nesting bombs, huge numbers and nested regex groups in every place a
file can carry them (PEFT adapter_config.json, safetensors metadata, a checkpoint's config.json and
shard index) are each an `InvalidFormatError` that names the file; and huge headers are read in linear
time or refused unparsed."""

from __future__ import annotations

import json
import re
import struct
import sys

import pytest
from _hostile import lora, raw_file

from zimage_lora import InvalidFormatError, examples, load_adapter
from zimage_lora.formats import grammar, read_adapter_file, safetensors_file, untrusted
from zimage_lora.keys import ModuleIndex
from zimage_lora.tools.checkpoint import open_checkpoint

pytestmark = pytest.mark.usefixtures("no_network")

DEEP = "[" * 100_000 + "]" * 100_000
LONG_NUMBER = "7" * 5000
NESTED_GROUPS = "(" * 5000 + "to_q" + ")" * 5000

INDEX = ModuleIndex(examples.tiny_model(seed=0))


def _peft(tmp_path, config_text: str):
    folder = tmp_path / "peft"
    folder.mkdir()
    raw_file(folder / "adapter_model.safetensors", {
        "base_model.model.layers.0.attention.to_q.lora_A.weight": ("F32", [4, 64]),
        "base_model.model.layers.0.attention.to_q.lora_B.weight": ("F32", [64, 4]),
    })
    (folder / "adapter_config.json").write_text(config_text)
    return folder


CONFIGS = {
    "deep": DEEP,
    "long-number": '{"r": 4, "lora_alpha": ' + LONG_NUMBER + "}",
    "nested-groups": json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": {NESTED_GROUPS: 2}}),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_peft_adapter_config(tmp_path, case):
    folder = _peft(tmp_path, CONFIGS[case])
    with pytest.raises(InvalidFormatError) as err:
        load_adapter(folder, INDEX)
    assert "peft/adapter" in str(err.value)  # adapter_config.json (JSON) or the adapter file (its pattern)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_lora_adapter_metadata(tmp_path, case):
    path = lora(tmp_path / "meta.safetensors", metadata={"lora_adapter_metadata": CONFIGS[case]})
    with pytest.raises(InvalidFormatError, match=re.escape(str(path))):
        load_adapter(path, INDEX)


def test_messages_name_the_limit(tmp_path):
    deep = _peft(tmp_path, DEEP)
    with pytest.raises(InvalidFormatError, match=r"adapter_config\.json.*nested 100000 deep; at most 64"):
        load_adapter(deep, INDEX)
    path = lora(tmp_path / "m.safetensors", metadata={"lora_adapter_metadata": CONFIGS["nested-groups"]})
    with pytest.raises(InvalidFormatError, match="groups nested 5000 deep; at most 50"):
        load_adapter(path, INDEX)


def test_limits_hold_whatever_the_interpreter_allows(tmp_path):
    """With Python's own digit limit lifted, a 5,000-digit number is still refused before parsing."""
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        folder = _peft(tmp_path, CONFIGS["long-number"])
        with pytest.raises(InvalidFormatError, match="a number of 5000 digits"):
            load_adapter(folder, INDEX)
    finally:
        sys.set_int_max_str_digits(before)


def test_large_headers_are_scanned_when_the_interpreter_allows_more(tmp_path):
    """Documents over 1 MiB skip the scan only while Python's own limits stand; lifted, it runs."""
    pad = "p" * (2 * untrusted.PRESCAN_ALWAYS_CHARS)
    header = '{"__metadata__": {"pad": "' + pad + '"}, "k": {"dtype": "F32", "shape": [1], "data_offsets": [0, '
    path = tmp_path / "big.safetensors"
    raw = (header + LONG_NUMBER + "]}}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(InvalidFormatError, match="Exceeds the limit"):  # Python's own guard, caught
        read_adapter_file(path)
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        with pytest.raises(InvalidFormatError, match="a number of 5000 digits"):
            read_adapter_file(path)
    finally:
        sys.set_int_max_str_digits(before)


def test_brackets_and_digits_inside_strings_do_not_count():
    text = json.dumps({"caption": "[" * 500 + "9" * 500, "n": [[1]]})
    assert untrusted.parse_json(text, "x") == json.loads(text)


def _checkpoint(tmp_path):
    folder = tmp_path / "transformer"
    examples.tiny_model(seed=1).save_pretrained(folder, max_shard_size="60KB")
    return folder


@pytest.mark.parametrize("bad", [DEEP, '{"dim": ' + LONG_NUMBER + "}"], ids=["deep", "long-number"])
def test_checkpoint_config_and_index(tmp_path, bad):
    folder = _checkpoint(tmp_path)
    index = next(folder.glob("*.index.json"))
    good_config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(bad)
    with pytest.raises(InvalidFormatError, match=re.escape(str(folder / "config.json"))):
        open_checkpoint(folder)
    (folder / "config.json").write_text(good_config)
    index.write_text(bad)
    with pytest.raises(InvalidFormatError, match=re.escape(str(index))):
        open_checkpoint(folder)


# --- huge headers ---------------------------------------------------------------------------------------

def _many_keys(path, n: int):
    """n/2 LoRA pairs for modules the model lacks (like the 950k-key file, minus its one real LoRA)."""
    entry = '"diffusion_model.junk_{}.proj.lora_{}.weight":{{"dtype":"F32","shape":[1,1],"data_offsets":[{},{}]}}'
    raw = ("{" + ",".join(entry.format(i // 2, "AB"[i % 2], 4 * i, 4 * i + 4) for i in range(n)) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * n))
    return path


def test_a_200k_key_header_is_read(tmp_path):
    """Linear-time reading; the time itself is measured by `bench/header.py` (docs/bad-inputs.md)."""
    f = read_adapter_file(_many_keys(tmp_path / "big.safetensors", 200_000))
    assert len(f.header.tensors) == 200_000
    assert len(f.groups) == 100_000 and f.groups[-1].stem == "junk_99999.proj"


def test_too_many_tensors_are_refused_unparsed(tmp_path, monkeypatch):
    path = _many_keys(tmp_path / "big.safetensors", 40)
    monkeypatch.setattr(safetensors_file, "MAX_TENSORS", 39)

    def tripwire(*args, **kwargs):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(safetensors_file, "parse_json", tripwire)
    with pytest.raises(InvalidFormatError, match="declares 40 tensors; at most 39 are accepted"):
        read_adapter_file(path)


def _split_role_reference(key: str):
    """The original rule, written plainly: strip PEFT's adapter name, then the longest suffix wins."""
    k = grammar._ADAPTER_SEGMENT.sub("", key).replace(".default.weight", ".weight")
    for suffix in sorted(grammar._SUFFIXES, key=len, reverse=True):
        if k.endswith(suffix) and len(k) > len(suffix):
            return (k[: -len(suffix)], *grammar._SUFFIXES[suffix])
    return None


def test_fast_suffix_lookup_agrees_with_the_plain_rule():
    stems = ["", "a", "layers.0.attention.to_q", "lora_unet_layers_0_attention_to_q", "x_lora", "x.default"]
    tails = sorted(grammar._SUFFIXES) + [".weight", ".default.weight", ".lora_A.default.weight", ".lora_A.default",
                                         "_lora.up.weight", ".lora", "lora_A", ".alpha.weight", ""]
    for stem in stems:
        for tail in tails:
            key = stem + tail
            assert grammar.split_role(key) == _split_role_reference(key), key
