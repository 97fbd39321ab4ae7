"""The bundled default inventory is what diffusers' own Z-Image-Turbo model gives, so `inspect` and
`convert` can skip importing diffusers without resolving keys any differently."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from zimage_lora.inventory import (
    MODULES_FILE,
    bundled_modules,
    inventory_model,
    meta_model,
    module_entries,
    stand_in_tree,
)
from zimage_lora.keys import ModuleIndex


@pytest.fixture(scope="module")
def diffusers_model():
    return meta_model()


def test_bundled_data_equals_the_diffusers_model(diffusers_model):
    expected = module_entries(diffusers_model)
    bundled = bundled_modules()
    assert list(bundled) == list(expected)  # same names, same order
    assert bundled == expected
    assert sum(e["linear"] for e in bundled.values()) == 276


def test_bundled_data_is_package_data():
    text = resources.files("zimage_lora").joinpath(MODULES_FILE).read_text()
    assert "ZImageTransformer2DModel" in json.loads(text)["source"]


def test_stand_in_resolves_like_the_diffusers_model(diffusers_model):
    ours, theirs = ModuleIndex(inventory_model()), ModuleIndex(diffusers_model)
    assert ours.shapes == theirs.shapes
    assert ours.dotted == theirs.dotted
    assert ours.flat == theirs.flat
    assert ours.ambiguous_flat == theirs.ambiguous_flat


def test_stand_in_has_no_storage_and_no_diffusers_class():
    model = inventory_model()
    assert all(p.is_meta for p in model.parameters())
    assert not any(type(m).__module__.startswith("diffusers") for m in model.modules())


def test_other_configs_still_build_the_diffusers_model():
    from zimage_lora.examples import tiny_config

    model = inventory_model(tiny_config())
    assert type(model).__name__ == "ZImageTransformer2DModel"


def test_stand_in_tree_keeps_children_of_a_leaf_named_after_a_container():
    tree = stand_in_tree({
        "a.b.c": {"shape": [4, 3], "bias": False, "linear": True},
        "a.b": {"shape": [4], "bias": True, "linear": False},
    })
    names = dict(tree.named_modules())
    assert names["a.b.c"].in_features == 3 and names["a.b"].bias.shape == (4,)
