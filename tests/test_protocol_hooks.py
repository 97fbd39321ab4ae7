"""The reading and writing hooks of the algorithm protocol, on test-only algorithms registered here:
two algorithms sharing one family told apart by shape (`claims`), an alpha kept as a tensor of the
algorithm (`alpha_role`), an integer flag (`value_roles`), a role that counts only beside its
companion (`layouts.tables.COMPANIONS`), a weight check that needs a value (`check_weight`), fused
row groups (`row_align`), and the table-driven writer spelling all of it.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora import algorithms, shapes
from zimage_lora.adapter import Target
from zimage_lora.algorithms.base import Algorithm, Kernel, amax
from zimage_lora.errors import IncompatibleWeightsError, InvalidFormatError, UnsupportedError
from zimage_lora.formats import grammar
from zimage_lora.formats.reader import read_adapter_file
from zimage_lora.keys.scales import scale_for
from zimage_lora.layouts import Item, tables, write
from zimage_lora.layouts.tables import Layout

STEM = "lycoris_layers_0_attention_to_q"


def _toy(name: str, ndim: int, **kw) -> Algorithm:
    """delta = W * m (m a vector over rows): only the hooks are under test here."""
    def check(shapes_, weight_shape, values):
        if values is not None and "flag" in values and int(values["flag"]) != 7:
            raise ValueError(f"flag is {int(values['flag'])}, this weight needs 7")

    return Algorithm(
        name=name, family="toyf", priority=60 + ndim, delta_shape=lambda s: (None, None), rank=lambda s: None,
        delta=lambda t, weight=None: weight, bypass=lambda x, t, weight=None: x, row_parts=lambda t: dict(t),
        delta_block=lambda p, lo, hi, weight=None: weight, dynamic_numel=lambda s: 1, describe=lambda s: name,
        needs_weight=True, claims=lambda s: len(s.get("m", ())) == ndim, check_weight=check,
        alpha_role="limit", value_roles=("flag",), unit_scale="the alpha is a limit",
        row_align=lambda parts: 4, **kw,
    )


@pytest.fixture
def toys(monkeypatch):
    for a in (_toy("toy2", 2), _toy("toy3", 3)):
        algorithms.register(a)
    monkeypatch.setitem(grammar._SUFFIXES, ".toy_m", ("toyf", "m"))
    monkeypatch.setitem(grammar._SUFFIXES, ".toy_flag", ("toyf", "flag"))
    yield
    for name in ("toy2", "toy3"):
        algorithms.unregister(name)


def _file(tmp_path, tensors: dict[str, torch.Tensor]):
    path = tmp_path / "toy.safetensors"
    save_file({f"{STEM}{k}": v for k, v in tensors.items()}, str(path))
    return read_adapter_file(path)


def test_algorithms_sharing_a_family_are_told_apart_by_claims(toys, tmp_path):
    for shape, name in (((8, 8), "toy2"), ((2, 4, 4), "toy3")):
        (group,) = _file(tmp_path, {".toy_m": torch.ones(shape)}).groups
        assert group.algorithm == name
    # Neither claims a 1-D tensor: the family's first, whose shape check then reports it.
    (group,) = _file(tmp_path, {".toy_m": torch.ones(8)}).groups
    assert group.algorithm == "toy2"


def test_an_alpha_role_is_a_tensor_of_the_algorithm_not_a_scale(toys, tmp_path):
    f = _file(tmp_path, {".toy_m": torch.ones(8, 8), ".alpha": torch.tensor(0.5)})
    (group,) = f.groups
    assert group.keys["limit"] == f"{STEM}.alpha" and group.alpha is None and group.alpha_key is None
    assert group.shapes["limit"] == ()
    scale = scale_for(f, group)
    assert (scale.scale, scale.rank, scale.rule) == (1.0, None, "1 (the alpha is a limit)")


def test_value_roles_may_be_integers_other_roles_may_not(toys, tmp_path):
    (group,) = _file(tmp_path, {".toy_m": torch.ones(8, 8), ".toy_flag": torch.tensor(1)}).groups
    assert set(group.keys) == {"m", "flag"}
    with pytest.raises(InvalidFormatError, match="must be floating point"):
        _file(tmp_path, {".toy_m": torch.ones(8, 8, dtype=torch.int64)})


def test_a_role_needing_a_companion_counts_only_beside_it(toys, tmp_path, monkeypatch):
    monkeypatch.setitem(grammar.COMPANIONS, ("toyf", "m"), "flag")
    alone = _file(tmp_path, {".toy_m": torch.ones(8, 8), "_other.lora_down.weight": torch.ones(2, 8),
                             "_other.lora_up.weight": torch.ones(8, 2)})
    assert [g.stem for g in alone.groups] == ["layers_0_attention_to_q_other"]
    assert [(u.key, u.reason.split(" (")[0]) for u in alone.unmatched] == [(f"{STEM}.toy_m", "no known adapter suffix")]
    (group,) = _file(tmp_path, {".toy_m": torch.ones(8, 8), ".toy_flag": torch.tensor(7)}).groups
    assert set(group.keys) == {"m", "flag"}


def test_check_weight_sees_the_values_once_read(toys):
    found = {"m": (8, 8), "flag": ()}
    assert shapes.check_delta("w", "toy2", found, out_rows=8, in_features=6) == 8  # header time: no values
    values = {"m": torch.ones(8, 8), "flag": torch.tensor(7)}
    assert shapes.check_delta("w", "toy2", found, out_rows=8, in_features=6, values=values) == 8
    with pytest.raises(IncompatibleWeightsError, match=r"w: the toy2 tensors do not fit the module's weight \[8, 6\]: "
                       "flag is 3, this weight needs 7"):
        shapes.check_delta("w", "toy2", found, out_rows=8, in_features=6, values={**values, "flag": torch.tensor(3)})


def test_fused_rows_must_take_whole_row_groups(toys):
    t = Target(module="m", algorithm="toy2", tensors={"m": torch.ones(12, 6)}, delta_rows=(4, 8))
    shapes.check_row_groups("w", t)
    with pytest.raises(IncompatibleWeightsError, match="rows 2:6 of the fused toy2 delta cut its groups of 4 rows"):
        shapes.check_row_groups("w", Target(module="m", algorithm="toy2", tensors=t.tensors, delta_rows=(2, 6)))
    shapes.check_row_groups("w", Target(module="m", algorithm="lora", tensors={}, delta_rows=(1, 3)))  # no groups


def test_the_writer_spells_an_alpha_role_with_the_scale_suffix_and_refuses_by_family(toys, monkeypatch):
    row = Layout("toy-layout", "tests", "lycoris_", {"toyf": {"m": ".toy_m", "flag": ".toy_flag"}, "scale":
                                                         tables.ALPHA}, flat=True)
    monkeypatch.setitem(write.LAYOUTS, row.name, row)
    assert row.algorithms == ("toyf",)
    item = Item("layers.0.attention.to_q", "toy3", {"m": torch.ones(2, 4, 4), "flag": torch.tensor(7),
                                                    "limit": torch.tensor(0.5)})
    sd, _meta, _config = write.state_dict([item], "toy-layout")
    assert sorted(sd) == [f"{STEM}.alpha", f"{STEM}.toy_flag", f"{STEM}.toy_m"]
    assert float(sd[f"{STEM}.alpha"]) == 0.5
    with pytest.raises(UnsupportedError, match=r"--to diffusers holds LoRA and DoRA only .*but the adapter has "
                       r"toy3 \(layers.0.attention.to_q\)\. No layout this tool writes keeps it\."):
        write.state_dict([item], "diffusers")


def test_unsupported_algorithm_message_lists_the_registry():
    assert grammar.unsupported_algorithm("x.vera_lambda_b") == "VeRA"
    titles = algorithms.titles()
    assert {"LoKr", "LoHa", "LoRA", "full diffs"} <= set(titles) and titles[-1] == "DoRA"


def _scaler(name: str, probe: bool) -> Algorithm:
    """delta = W * v per output row, with a bound 4x too large: only the exact check can admit more."""
    kernel = Kernel(name=name, add_=lambda rows, x, wx, t, alpha: rows.add_(wx * (t["v"] * alpha)),
                    bound=lambda t: 4.0 * amax(t["v"]) * float(t["wmax"]), uses_wx=True, probe=probe)
    return Algorithm(
        name=name, family=name, priority=70, delta_shape=lambda s: (s["v"][0], None), rank=lambda s: None,
        delta=lambda t, weight=None: weight * t["v"][:, None], bypass=lambda x, t, weight=None: x,
        row_parts=lambda t: {"v": t["v"].float()},
        delta_block=lambda p, lo, hi, weight=None: weight * p["v"][lo:hi, None],
        dynamic_numel=lambda s: s["v"][0], describe=lambda s: name, needs_weight=True, kernels=(kernel,),
        prepare=lambda t, scale, placement, weight: (name, {"v": t["v"].float() * scale, "wmax": weight.abs().max()}),
    )


@pytest.mark.parametrize("probe", [True, False])
def test_the_exact_overflow_check_probes_kernels_that_need_the_weight(probe):
    """max |delta| is 1 (W's largest value 1, v = 1), the bound says 4: strength 3e38 fits fp32 exactly."""
    from torch import nn

    from zimage_lora import Adapter, LoRAError, apply_adapter

    algorithms.register(_scaler("toy_scaler", probe))
    try:
        model = nn.Sequential(nn.Linear(6, 8, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.linspace(-1, 1, 48).reshape(8, 6))
        adapter = Adapter(name="s", format="test", source="test",
                          targets=[Target(module="0", algorithm="toy_scaler", tensors={"v": torch.ones(8)})])
        if probe:
            apply_adapter(model, adapter, mode="dynamic", name="s", scale=3e38)
            assert torch.isfinite(model(torch.eye(6)[:1] * 0.5)).all()
        else:
            with pytest.raises(LoRAError, match="overflows"):
                apply_adapter(model, adapter, mode="dynamic", name="s", scale=3e38)
    finally:
        algorithms.unregister("toy_scaler")
