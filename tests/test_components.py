"""A pipeline is a list of components changed together: every public change that the second component
(the text encoder) refuses, or that fails there, leaves both components bit-identical to before it.

Refusals are real: the text encoder runs in fp16, so a strength that the fp32 transformer holds
overflows there. Faults are injected into the change's own steps (a transaction's, or for a change of
strengths and active flags alone those of `apply.retune`), only for the text encoder, so the transformer
has already changed when they fire.
"""

from __future__ import annotations

import pytest
import torch
from _engine_state import assert_same, fingerprint
from _pipeline_files import TE_TARGETS, TR_TARGETS, factors, write
from _tiny_pipeline import tiny_pipeline

from zimage_lora import (
    Adapters,
    LoRAError,
    apply_adapter,
    list_adapters,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)
from zimage_lora.apply import retune, transaction
from zimage_lora.apply.layer import AdapterLinear
from zimage_lora.apply.state import Strength, get_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BIG = 1e7  # finite in the fp32 transformer's deltas, past fp16's 65504 in the text encoder's


def _file(tmp_path, pipe, seed):
    te = factors(pipe.text_encoder, TE_TARGETS, seed)
    tr = factors(pipe.transformer, TR_TARGETS, seed + 100)
    return write(tmp_path / f"f{seed}.safetensors", "kohya", te, tr)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("components")
    pipe = tiny_pipeline(seed=0)
    pipe.text_encoder.half()
    return tmp, {seed: _file(tmp, pipe, seed) for seed in (1, 2, 3, 4)}


@pytest.fixture
def pipe(built):
    """dynamic "a" (fp32 compute), merged "m", inactive dynamic "off", on both components."""
    _, files = built
    pipe = tiny_pipeline(seed=0)
    pipe.text_encoder.half()
    apply_adapter(pipe, files[1], name="a", compute_dtype=torch.float32)
    apply_adapter(pipe, files[2], name="m", mode="merged", scale=0.5)
    apply_adapter(pipe, files[3], name="off")
    set_active_adapters(pipe, ["a", "m"])
    assert [(i.name, i.components) for i in list_adapters(pipe)] == [
        ("a", ("transformer", "text_encoder")), ("m", ("transformer", "text_encoder")),
        ("off", ("transformer", "text_encoder")),
    ]
    return pipe


# Each public change, run on the pipeline: (name, call(pipe, files), fault point on the text encoder).
OPS = {
    "apply dynamic": (lambda p, f: apply_adapter(p, f[4], name="new"), "attach"),
    "apply merged": (lambda p, f: apply_adapter(p, f[4], name="new", mode="merged"), "rebuild"),
    "replace merged": (lambda p, f: apply_adapter(p, f[4], name="m", mode="merged"), "rebuild"),
    "hot swap": (lambda p, f: apply_adapter(p, f[4], name="a", compute_dtype=torch.float32), "swap"),
    "remove one": (lambda p, f: remove_adapter(p, "a"), "detach"),
    "remove merged": (lambda p, f: remove_adapter(p, "m"), "rebuild"),
    "remove all": (lambda p, f: remove_adapter(p), "rebuild"),
    "unload two": (lambda p, f: Adapters(p).unload(["a", "m"]), "detach"),
    "re-weight merged": (lambda p, f: set_adapter_scale(p, "m", 2.0), "rebuild"),
    "set active": (lambda p, f: set_active_adapters(p, ["a", "off"]), "publish_fast"),
    "set active dynamic": (lambda p, f: set_active_adapters(p, ["a", "m", "off"]), "retune.publish_fast"),
    "set active merged off": (lambda p, f: set_active_adapters(p, ["a"]), "rebuild"),
    "set active weights": (lambda p, f: set_active_adapters(p, ["m", "off"], [2.0, 3.0]), "rebuild"),
    "fuse": (lambda p, f: Adapters(p).fuse("a"), "rebuild"),
    "fuse inactive": (lambda p, f: Adapters(p).fuse("off"), "detach"),
    "unfuse": (lambda p, f: Adapters(p).unfuse("m"), "attach"),
    "enable": (lambda p, f: Adapters(p).enable("off"), "retune.publish_fast"),
    "re-weight dynamic": (lambda p, f: set_adapter_scale(p, "a", 2.0), "Strength.set"),
    "disable": (lambda p, f: Adapters(p).disable("m"), "rebuild"),
}

# Refused by the fp16 text encoder only (the transformer alone takes each of these).
REFUSALS = {
    "apply dynamic": lambda p, f: apply_adapter(p, f[4], name="new", scale=BIG),
    "apply merged": lambda p, f: apply_adapter(p, f[4], name="new", mode="merged", scale=BIG),
    "hot swap": lambda p, f: apply_adapter(p, f[4], name="a", scale=BIG),
    "re-weight dynamic": lambda p, f: set_adapter_scale(p, "off", BIG),
    "re-weight merged": lambda p, f: set_adapter_scale(p, "m", BIG),
    "set active weights": lambda p, f: set_active_adapters(p, ["m", "off"], [1.0, BIG]),
    "set active merged weight": lambda p, f: set_active_adapters(p, ["a", "m"], [1.0, BIG]),
    "fuse": lambda p, f: Adapters(p).fuse("a"),  # after "a" (fp32 compute) is re-weighted to BIG below
}


def _check_unchanged(pipe, call, files, error):
    before = [fingerprint(pipe.transformer), fingerprint(pipe.text_encoder)]
    listed = list_adapters(pipe)
    with pytest.raises(error):
        call(pipe, files)
    assert_same(fingerprint(pipe.transformer), before[0])
    assert_same(fingerprint(pipe.text_encoder), before[1])
    assert list_adapters(pipe) == listed


@pytest.mark.parametrize("op", list(OPS))
def test_a_fault_in_the_text_encoder_leaves_both_components_as_they_were(built, pipe, monkeypatch, op):
    call, point = OPS[op]
    owner, attr = _owner(point)
    real = getattr(owner, attr)
    fired = []

    def failing(self, *args, **kwargs):
        if _model(self, args, pipe) is pipe.text_encoder and not fired:  # once: the rollback's own rebuild runs
            fired.append(point)
            raise RuntimeError(f"injected in the text encoder's {point}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)
    _check_unchanged(pipe, call, built[1], RuntimeError)
    assert fired  # the fault fired where it was meant to
    monkeypatch.undo()
    call(pipe, built[1])  # and without it the change goes through on both
    remove_adapter(pipe)
    assert list_adapters(pipe) == [] and not any(
        isinstance(m, AdapterLinear) for c in (pipe.transformer, pipe.text_encoder) for m in c.modules()
    )


def _owner(point):
    """Where a fault point lives: a `Transaction` method, `Strength.set`, or a name `apply.retune` calls."""
    if point == "Strength.set":
        return Strength, "set"
    if point.startswith("retune."):
        return retune, point.removeprefix("retune.")
    return transaction.Transaction, point


def _model(first, args, pipe):
    """The component a faulted call works on: a transaction's model, `publish_fast`'s first argument, or
    for a strength the component whose record holds it."""
    if isinstance(first, transaction.Transaction):
        return first.model
    if isinstance(first, Strength):
        owners = [c for c in (pipe.transformer, pipe.text_encoder)
                  if any(r.strength is first for r in get_state(c).records.values())]
        return owners[0] if owners else None
    return first


@pytest.mark.parametrize("op", list(REFUSALS))
def test_a_refusal_by_the_text_encoder_leaves_both_components_as_they_were(built, pipe, op):
    if op == "fuse":  # "a" computes in fp32, so dynamic takes BIG; merged into fp16 weights it cannot
        set_adapter_scale(pipe, "a", BIG)
        assert list_adapters(pipe)[0].scale == BIG
    _check_unchanged(pipe, REFUSALS[op], built[1], LoRAError)
