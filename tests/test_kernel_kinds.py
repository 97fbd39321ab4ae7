"""Kernel kinds are typed: the kernels the engines decide on are `algorithms.base.KernelKind` members, from
the kernel registry to a prepared target to a slot, and no engine code decides on a kernel name spelled
as a string."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from zimage_lora import algorithms, apply_adapter, examples
from zimage_lora.algorithms.base import KernelKind
from zimage_lora.apply.layer import AdapterLinear

SRC = Path(algorithms.__file__).parent.parent
ENGINE_DIRS = ("apply", "mlx")


def test_each_kind_names_its_registered_kernel():
    for kind in KernelKind:
        assert algorithms.kernel(kind).name is kind
        assert algorithms.kernel(kind.value) is algorithms.kernel(kind)  # a member is its string


@pytest.mark.parametrize(("layout", "kind"), [("diffusers", KernelKind.LORA), ("lycoris-lokr", KernelKind.LOKR),
                                              ("lycoris-loha", KernelKind.DENSE)])
def test_a_slot_carries_the_member_its_algorithm_prepared(tmp_path, layout, kind):
    model = examples.tiny_model(seed=0)
    targets = examples.linear_names(model)[3:5]
    path = examples.make_adapter(layout, tmp_path / "a.safetensors", model, seed=1, targets=targets)
    apply_adapter(model, path, mode="dynamic")
    slots = [s for m in model.modules() if isinstance(m, AdapterLinear) for s in m.slots.values()]
    assert slots and all(s.kind is kind for s in slots)
    assert all(s.plain_lora == (kind is KernelKind.LORA) for s in slots)


def _string_decisions(path: Path) -> list[str]:
    """Comparisons (`==`, `!=`, `in`, `not in`) and dict keys in `path` that spell a kernel kind's string."""
    names = {k.value for k in KernelKind} - {KernelKind.BIAS.value}  # "bias" is also a layer's attribute
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        consts: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            consts = [node.left, *node.comparators]
            consts += [e for c in node.comparators if isinstance(c, ast.Tuple | ast.Set | ast.List) for e in c.elts]
        elif isinstance(node, ast.Dict):
            consts = [k for k in node.keys if k is not None]
        found += [f"{path.name}:{c.lineno} {c.value!r}" for c in consts
                  if isinstance(c, ast.Constant) and c.value in names]
    return found


def test_no_engine_code_decides_on_a_kernel_name_string():
    paths = [p for d in ENGINE_DIRS for p in sorted((SRC / d).glob("*.py"))]
    assert len(paths) > 10
    assert [f for p in paths for f in _string_decisions(p)] == []


def test_the_string_check_finds_a_string_decision(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(slot):\n    return slot.kind == "lora" or slot.kind in ("dense",)\nT = {"lokr": 1}\n')
    assert len(_string_decisions(bad)) == 3
