"""PEFT's `alpha_pattern` / `rank_pattern` against PEFT itself.

The adapter folder is written by PEFT's own saving code (`get_peft_model(...).save_pretrained`) and
loaded back by PEFT (`PeftModel.from_pretrained`); every module's rank and scaling there must be the
rank and scale our loader reads from the same folder. Ranks come from the tensor shapes, so a
`rank_pattern` agrees with them by construction; the alpha comes from `alpha_pattern`, matched with
PEFT's rule (peft.utils.other.get_pattern_key).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key

from zimage_lora import examples, load_adapter
from zimage_lora.formats.reader import pattern_value

MODEL = examples.tiny_model(seed=0)
NAMES = sorted(n for n, m in MODEL.named_modules() if isinstance(m, torch.nn.Linear))

# Literal full names, a suffix matching several modules, a real regex, a '.' standing for '_' (PEFT
# runs every pattern as a regex), and two patterns for one module (the first in the config wins).
ALPHA_PATTERN = {
    "layers.1.attention.to_k": 11,
    "to_k": 5,
    r"layers\.1\.feed_forward\.w[13]": 7,
    "attention.to.v": 9,
    "layers.0.attention.to_q": 3,
}
RANK_PATTERN = {"feed_forward.w2": 8, "layers.0.attention.to_v": 2}


@pytest.mark.parametrize("rslora", [False, True])
def test_patterns_match_peft_loading_the_same_folder(tmp_path, rslora):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "w1", "w2", "w3"], rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN, use_rslora=rslora, init_lora_weights=False,
    )
    get_peft_model(copy.deepcopy(MODEL), config).save_pretrained(tmp_path)
    peft = PeftModel.from_pretrained(copy.deepcopy(MODEL), tmp_path)
    theirs = {
        n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for n, m in peft.named_modules() if isinstance(m, LoraLayer)
    }
    ours = {t.module: (t.rank, t.scale) for t in load_adapter(tmp_path, MODEL).targets}
    assert len(theirs) == 24 and ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if v != pytest.approx(theirs[k])} == {}
    # The patterns did something: ranks 2, 4 and 8 and five different alphas among the modules.
    assert {r for r, _ in theirs.values()} == {2, 4, 8}
    assert theirs["layers.0.attention.to_v"][1] == pytest.approx(9 / (2 ** 0.5 if rslora else 2))


# Patterns PEFT treats as regexes but that hold no regex syntax except '.': names, their suffixes,
# and the same with some characters replaced by '.'.
@st.composite
def literal_patterns(draw) -> str:
    name = draw(st.sampled_from(NAMES))
    parts = name.split(".")
    tail = ".".join(parts[draw(st.integers(0, len(parts) - 1)):])
    start = draw(st.integers(0, max(0, len(tail) - 1)))
    cut = tail[start:] if draw(st.booleans()) else tail
    dots = draw(st.sets(st.integers(0, len(cut) - 1), max_size=3))
    return "".join("." if i in dots else c for i, c in enumerate(cut))


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(literal_patterns(), min_size=1, max_size=4, unique=True), st.sampled_from(NAMES))
def test_pattern_lookup_is_peft_get_pattern_key(patterns, name):
    table = {p: i for i, p in enumerate(patterns)}
    key = get_pattern_key(list(table), name)
    assert pattern_value(table, name) == table.get(key)
