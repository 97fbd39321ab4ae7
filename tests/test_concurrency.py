"""Concurrency: forward passes in one thread while another attaches, re-weights and removes adapters.

Every adapter state the changing thread goes through is replayed first, single-threaded, to get
the output the model gives in that state. Each concurrent forward must then equal one of these
outputs: it saw the adapter set before or after a change, never a mix of layers from both, and no
thread raised.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from _hostile import assert_untouched, state_bits

from zimage_lora import apply_adapter, examples, list_adapters, remove_adapter, set_adapter_scale

CYCLES = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    model = examples.tiny_model(seed=0)
    return {
        "anchor": examples.make_adapter("ai-toolkit", tmp / "anchor.safetensors", model, seed=5,
                                        targets=["layers.1.feed_forward.w2"]),
        "a": examples.make_adapter("kohya", tmp / "a.safetensors", model, seed=1),
        "b": examples.make_adapter("lycoris-lokr", tmp / "b.safetensors", model, seed=2),
    }


def _steps(files: dict[str, Path], mode: str) -> list:
    """The changes, in order; the model is in a distinct state after each."""
    return [
        lambda m: apply_adapter(m, files["a"], mode=mode, name="a", scale=1.0),
        lambda m: set_adapter_scale(m, "a", -0.5),
        lambda m: apply_adapter(m, files["b"], mode=mode, name="b", scale=0.8),
        lambda m: set_adapter_scale(m, "b", 2.0),
        lambda m: remove_adapter(m, "a"),
        lambda m: remove_adapter(m, "b"),  # back to the first state: the cycle repeats
    ]


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return bool((x - y).abs().max() <= 1e-5 * (1 + y.abs().max()))


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_forwards_see_old_or_new_state(mode, files):
    model = examples.tiny_model(seed=0)
    pristine = state_bits(model)
    inputs = examples.tiny_inputs(seed=3)
    # An adapter attached before the threads start (see docs/threading.md: the first attach is not
    # synchronised with forwards already running).
    apply_adapter(model, files["anchor"], mode="dynamic", name="anchor")
    steps = _steps(files, mode)

    references = [examples.run_model(model, inputs)]
    for step in steps:
        step(model)
        references.append(examples.run_model(model, inputs))
    assert _close(references[-1], references[0])
    states = references[:-1]
    for i in range(len(states)):
        for j in range(i):
            assert not _close(states[i], states[j]), f"states {i} and {j} cannot be told apart"

    outputs: list[torch.Tensor] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def forwards() -> None:
        try:
            while not done.is_set() or len(outputs) < 4:
                outputs.append(examples.run_model(model, inputs))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def changes() -> None:
        try:
            for _ in range(CYCLES):
                for step in steps:
                    step(model)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=forwards), threading.Thread(target=forwards), threading.Thread(target=changes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    assert not errors, repr(errors[0])

    seen = [next((i for i, ref in enumerate(states) if _close(out, ref)), None) for out in outputs]
    mixed = [k for k, s in enumerate(seen) if s is None]
    assert not mixed, f"{len(mixed)} of {len(outputs)} forwards saw a mix of two adapter states"
    assert len(outputs) >= 8
    assert [a.name for a in list_adapters(model)] == ["anchor"]
    remove_adapter(model)
    assert_untouched(model, pristine)


def _change_concurrently(model, files) -> list[BaseException]:
    errors: list[BaseException] = []

    def worker(name: str, path: Path, mode: str) -> None:
        try:
            for i in range(4):
                apply_adapter(model, path, mode=mode, name=name, scale=0.5 + i)
                set_adapter_scale(model, name, -1.0)
                remove_adapter(model, name)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=("x", files["a"], "merged")),
               threading.Thread(target=worker, args=("y", files["b"], "dynamic")),
               threading.Thread(target=worker, args=("z", files["a"], "dynamic"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    return errors


def test_concurrent_changes_are_serialised(files):
    """Three threads changing adapters at once, while one adapter stays attached: every change lands
    whole, and the model comes back exactly."""
    model = examples.tiny_model(seed=0)
    pristine = state_bits(model)
    apply_adapter(model, files["anchor"], mode="merged", name="anchor")
    errors = _change_concurrently(model, files)
    assert not errors, repr(errors[0])
    assert [a.name for a in list_adapters(model)] == ["anchor"]
    remove_adapter(model)
    assert_untouched(model, pristine)


def test_concurrent_changes_from_an_empty_model(files):
    model = examples.tiny_model(seed=0)
    pristine = state_bits(model)
    errors = _change_concurrently(model, files)
    assert not errors, repr(errors[0])
    assert list_adapters(model) == []
    assert_untouched(model, pristine)
