"""demo: every layout passes both modes on the tiny model, and a broken restore fails the run."""

from __future__ import annotations

import pytest

from zimage_lora.cli import main
from zimage_lora.examples import LAYOUTS
from zimage_lora.tools import demo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_all_layouts_pass(capsys, tmp_path):
    assert main(["demo", "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for layout in LAYOUTS:
        assert layout in out
    assert f"{len(LAYOUTS)} layouts x 2 modes: all passed" in out
    assert (tmp_path / "kohya.safetensors").is_file() and (tmp_path / "peft" / "adapter_config.json").is_file()


def test_demo_rows_measure_something():
    rows = demo.run_demo(["lycoris-lokr", "peft-dora"])
    assert [(r.layout, r.mode) for r in rows] == [
        ("lycoris-lokr", "merged"), ("lycoris-lokr", "dynamic"), ("peft-dora", "merged"), ("peft-dora", "dynamic")
    ]
    assert all(r.passed and r.targets == 37 and r.change > 0.01 for r in rows)
    assert rows[2].algorithm == "lora+dora" and rows[0].algorithm == "lokr"


def test_demo_fails_when_restore_is_not_exact(monkeypatch, capsys):
    import zimage_lora.apply as apply

    monkeypatch.setattr(apply, "remove_adapter", lambda model, name=None: None)  # leaves the adapter in place
    assert main(["demo", "--layouts", "kohya"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_demo_unknown_layout(capsys):
    assert main(["demo", "--layouts", "nope"]) == 1
    assert "unknown layout" in capsys.readouterr().err
