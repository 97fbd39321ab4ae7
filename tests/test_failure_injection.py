"""Failures injected in the middle of an apply / remove / re-weight: the model comes back bit-exactly.

A function the engine calls once per layer (or per block of rows, after a block was already written
into the weight) is made to raise on its k-th call, once; the rollback then runs with the real
function. Afterwards every parameter, buffer and module class must be bit-identical to the state
before the call, the adapter list unchanged, and the forward output identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _hostile import assert_untouched, state_bits

from zimage_lora import apply_adapter, examples, list_adapters, remove_adapter, set_adapter_scale
from zimage_lora.apply import merge, transaction


class Injected(RuntimeError):
    pass


def _inject(monkeypatch, owner, attr: str, after: int, exc: type[BaseException] = Injected) -> dict:
    """Make `owner.attr` raise `exc` on call number `after + 1` (once); other calls go through."""
    real = getattr(owner, attr)
    calls = {"n": 0, "raised": False}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after + 1 and not calls["raised"]:
            calls["raised"] = True
            raise exc(f"injected failure in {attr} after {after} calls")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


# (mode, owner, attribute): something the engine calls per layer / per block while changing weights.
POINTS = [
    ("merged", merge, "add_rows"),  # once per block of rows, after earlier blocks and layers were written
    ("merged", merge, "rebuild"),  # once per merged module
    ("merged", merge, "take_snapshot"),
    ("dynamic", transaction.Transaction, "attach"),  # once per wrapped layer
    ("dynamic", transaction, "_set_child"),  # swapping a Linear for its wrapper
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    model = examples.tiny_model(seed=0)
    return {
        layout: examples.make_adapter(layout, tmp / f"{layout}.safetensors", model, seed=i)
        for i, layout in enumerate(["kohya", "lycoris-full", "lycoris-lokr", "lycoris-dora"])
    } | {
        # covers only layer 0: applying a full-model adapter on top snapshots the other layers anew
        "layer0": examples.make_adapter("lycoris-full", tmp / "layer0.safetensors", model, seed=9,
                                        targets=[n for n in examples.linear_names(model) if n.startswith("layers.0.")])
    }


@pytest.fixture
def model():
    return examples.tiny_model(seed=0)


def _output(model) -> torch.Tensor:
    return examples.run_model(model, examples.tiny_inputs(seed=1))


def _names(model) -> list[tuple[str, str, float]]:
    return [(a.name, a.mode, a.scale) for a in list_adapters(model)]


FRESH = [(p, 0, "kohya") for p in POINTS] + [(p, 7, "kohya") for p in POINTS] + [
    (p, 1, "lycoris-full") for p in POINTS if p[0] == "merged"  # diff_b: the bias is written too
]


@pytest.mark.parametrize(("point", "after", "layout"), FRESH, ids=lambda v: v[2] if isinstance(v, tuple) else str(v))
def test_fresh_model_restored(point, after, layout, files, model, monkeypatch):
    mode, owner, attr = point
    before, out_before = state_bits(model), _output(model)
    calls = _inject(monkeypatch, owner, attr, after)
    with pytest.raises(Injected):
        apply_adapter(model, files[layout], mode=mode, name="new")
    assert calls["raised"], f"{attr} was called only {calls['n']} times"
    assert_untouched(model, before)
    assert _names(model) == []
    monkeypatch.undo()
    assert torch.equal(_output(model), out_before)
    # The engine still works after the failure.
    apply_adapter(model, files[layout], mode=mode, name="new")
    remove_adapter(model)
    assert_untouched(model, before)


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
# (every layer is already wrapped by "d", so no Linear is swapped: _set_child is not called)
@pytest.mark.parametrize("point", [p for p in POINTS if p[2] != "_set_child"], ids=lambda p: f"{p[0]}-{p[2]}")
def test_failure_with_adapters_already_attached(point, exc, files, model, monkeypatch):
    """A merged and a dynamic adapter are on the model; applying a third fails half-way."""
    mode, owner, attr = point
    pristine = state_bits(model)
    apply_adapter(model, files["layer0"], mode="merged", name="m", scale=0.7)
    apply_adapter(model, files["kohya"], mode="dynamic", name="d", scale=-1.5)
    before, out_before, names_before = state_bits(model), _output(model), _names(model)
    calls = _inject(monkeypatch, owner, attr, after=3, exc=exc)
    with pytest.raises(exc):
        apply_adapter(model, files["lycoris-lokr"], mode=mode, name="new", scale=2.0)
    assert calls["raised"]
    monkeypatch.undo()
    assert_untouched(model, before)
    assert _names(model) == names_before
    assert torch.equal(_output(model), out_before)
    remove_adapter(model)
    assert_untouched(model, pristine)


# (the replaced adapter covered the same modules: their originals are kept already, take_snapshot is not called)
@pytest.mark.parametrize("point", [p for p in POINTS if p[0] == "merged" and p[2] != "take_snapshot"],
                         ids=lambda p: p[2])
def test_failure_replacing_an_adapter(point, files, model, monkeypatch):
    """Re-applying an existing name (replace) fails half-way: the old adapter stays, exactly."""
    _mode, owner, attr = point
    apply_adapter(model, files["kohya"], mode="merged", name="x", scale=0.5)
    before, names_before = state_bits(model), _names(model)
    _inject(monkeypatch, owner, attr, after=2)
    with pytest.raises(Injected):
        apply_adapter(model, files["lycoris-dora"], mode="merged", name="x")
    monkeypatch.undo()
    assert_untouched(model, before)
    assert _names(model) == names_before


@pytest.mark.parametrize("after", [0, 5])
def test_failure_during_merged_rescale(after, files, model, monkeypatch):
    apply_adapter(model, files["lycoris-lokr"], mode="merged", name="m", scale=1.0)
    apply_adapter(model, files["kohya"], mode="merged", name="k", scale=0.3)
    before, names_before = state_bits(model), _names(model)
    _inject(monkeypatch, merge, "add_rows", after)
    with pytest.raises(Injected):
        set_adapter_scale(model, "m", 4.0)
    monkeypatch.undo()
    assert_untouched(model, before)
    assert _names(model) == names_before


@pytest.mark.parametrize("after", [0, 5])
def test_failure_during_remove(after, files, model, monkeypatch):
    apply_adapter(model, files["lycoris-lokr"], mode="merged", name="m")
    apply_adapter(model, files["kohya"], mode="merged", name="k")
    apply_adapter(model, files["lycoris-full"], mode="dynamic", name="d")
    before, names_before, out_before = state_bits(model), _names(model), _output(model)
    _inject(monkeypatch, merge, "add_rows", after)
    with pytest.raises(Injected):
        remove_adapter(model, "m")
    monkeypatch.undo()
    assert_untouched(model, before)
    assert _names(model) == names_before
    assert torch.equal(_output(model), out_before)


def test_nan_adapter_object_is_refused_before_any_change(files, model):
    """An `Adapter` built by hand (not through the loader) with NaN values: refused, nothing changes."""
    from zimage_lora import LoRAError, load_adapter

    adapter = load_adapter(files["kohya"], model)
    victim = adapter.targets[len(adapter.targets) // 2]
    victim.tensors["up"] = victim.tensors["up"].clone()
    victim.tensors["up"][0, 0] = float("nan")
    before = state_bits(model)
    for mode in ("merged", "dynamic"):
        with pytest.raises(LoRAError, match="(?i)nan|finite"):
            apply_adapter(model, adapter, mode=mode, name="nan")
        assert_untouched(model, before)


def test_wrong_shape_adapter_object_is_refused(files, model):
    from zimage_lora import LoRAError, load_adapter

    adapter = load_adapter(files["kohya"], model)
    adapter.targets[-1].tensors["down"] = torch.zeros(4, 3)
    before = state_bits(model)
    for mode in ("merged", "dynamic"):
        with pytest.raises(LoRAError):
            apply_adapter(model, adapter, mode=mode, name="bad")
        assert_untouched(model, before)


_KILL_SCRIPT = """
import sys, time
from zimage_lora.tools import checkpoint_merge
real = checkpoint_merge.merge_weight
def slow(weight, targets):
    time.sleep(0.05)  # long enough for the parent to kill us mid-write
    return real(weight, targets)
checkpoint_merge.merge_weight = slow
checkpoint_merge.merge_checkpoint(sys.argv[1], [sys.argv[2]], sys.argv[3])
"""


def test_merge_killed_mid_write_leaves_no_output(files, tmp_path):
    """SIGKILL (no cleanup can run) while `merge_checkpoint` writes: the output path never exists."""
    import signal
    import subprocess
    import sys
    import time

    model = examples.tiny_model(seed=0)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder, max_shard_size="60KB")
    out = tmp_path / "merged.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(folder), str(files["kohya"]), str(out)])
    try:
        deadline = time.monotonic() + 60
        while not any("partial" in p.name for p in tmp_path.iterdir()):
            assert proc.poll() is None, "merge finished before it could be killed"
            assert time.monotonic() < deadline, "merge never started writing"
            time.sleep(0.01)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()


@pytest.mark.parametrize("after", [1, 3])
def test_failure_removing_the_only_adapter_on_some_layers(after, files, model, monkeypatch):
    """Removing a merged adapter puts back the originals of the layers nothing else patches, one by one;
    a failure after some were put back must merge the adapter into those layers again."""
    apply_adapter(model, files["layer0"], mode="merged", name="m", scale=0.7)
    apply_adapter(model, files["kohya"], mode="dynamic", name="d")
    before, names_before, out_before = state_bits(model), _names(model), _output(model)
    calls = _inject(monkeypatch, merge, "restore", after)
    with pytest.raises(Injected):
        remove_adapter(model, "m")
    assert calls["raised"]
    monkeypatch.undo()
    assert_untouched(model, before)
    assert _names(model) == names_before
    assert torch.equal(_output(model), out_before)


@pytest.mark.parametrize("layout", ["kohya", "lycoris-dora", "lycoris-lokr"])
@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_failure_during_a_hot_swap(exc, layout, files, model, monkeypatch):
    """A same-shaped adapter copied into the slots of the attached one fails after some layers were
    copied: every slot holds its old values again, and the old adapter is the one listed. (DoRA and
    LoKr too: the undo prepares the old values again from the old adapter.)"""
    from zimage_lora.apply.layer import Slot

    again = examples.make_adapter(layout, files[layout].with_name(f"again-{layout}.safetensors"), model, seed=7)
    apply_adapter(model, files[layout], mode="dynamic", name="x", scale=0.5)
    before, names_before, out_before = state_bits(model), _names(model), _output(model)
    calls = _inject(monkeypatch, Slot, "load_", after=3, exc=exc)
    with pytest.raises(exc):
        apply_adapter(model, again, name="x", scale=2.0)
    assert calls["raised"]
    monkeypatch.undo()
    assert_untouched(model, before)
    assert _names(model) == names_before
    assert list_adapters(model)[0].source == str(files[layout])
    assert torch.equal(_output(model), out_before)
    assert apply_adapter(model, again, name="x").hotswapped  # and the swap works afterwards
