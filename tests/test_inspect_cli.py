"""`zimage-lora inspect`: the JSON contract read by outside tools, and the human tables."""

from __future__ import annotations

import json

from zimage_lora import examples
from zimage_lora.cli import main


def test_inspect_json_contract(tmp_path, tiny, tiny_config_file, capsys):
    path = examples.make_adapter("mixed", tmp_path / "anime.safetensors", tiny)
    assert main(["inspect", str(path), "--model", str(tiny_config_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["format"], str) and "mixed" in info["format"]
    assert sorted(info["matched"]) == sorted(examples.linear_names(tiny))
    assert info["unmatched"] and all(set(u) == {"key", "reason"} for u in info["unmatched"])
    assert info["coverage"]["by_block"]["layers"] == "16/16"
    assert info["ranks"] == {"4": 37} and info["adapter_bytes"] > 0 and info["dynamic_extra_bytes"] > 0


def test_inspect_default_inventory_reports_shape_errors(tmp_path, tiny, capsys):
    # A tiny adapter against the full-size default inventory: the shapes cannot fit; exit code 1.
    path = examples.make_adapter("kohya", tmp_path / "tiny.safetensors", tiny)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "expects" in err and "lora_unet_" in err


def test_inspect_tables(tmp_path, tiny, tiny_config_file, capsys):
    path = examples.make_adapter("lycoris-lokr-factorized", tmp_path / "lokr.safetensors", tiny)
    assert main(["inspect", str(path), "--model", str(tiny_config_file)]) == 0
    out = capsys.readouterr().out
    assert "lycoris" in out and "lokr" in out and "37 of 37" in out


def test_inspect_strict_fails_on_unmatched(tmp_path, tiny, tiny_config_file, capsys):
    path = examples.make_adapter("mixed", tmp_path / "anime.safetensors", tiny)
    assert main(["inspect", str(path), "--model", str(tiny_config_file), "--strict"]) == 1
    assert "strict" in capsys.readouterr().err
