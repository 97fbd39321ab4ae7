"""The whole engine-visible state of a model, for "a refused change left it bit-identical" checks."""

from __future__ import annotations

import torch

from zimage_lora.apply.layer import AdapterLinear
from zimage_lora.apply.state import get_state


def fingerprint(module: torch.nn.Module) -> tuple:
    """Everything a change may touch: the module tree, every tensor (slot buffers included), each
    wrapper's active slots, and the engine's records (mode, active, strength, adapter)."""
    state = get_state(module)
    return (
        [(n, type(m), id(m)) for n, m in module.named_modules()],
        {n: t.detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]},
        {n: tuple(m.active_keys()) for n, m in module.named_modules() if isinstance(m, AdapterLinear)},
        None if state is None else [(r.name, r.mode, r.active, r.strength.value, id(r.adapter))
                                    for r in state.records.values()],
    )


def assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k, v in a[1].items():  # bit for bit: NaN payloads and -0.0 included
        w = b[1][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        assert torch.equal(v.view(-1).view(torch.uint8), w.view(-1).view(torch.uint8)), f"{k} changed"
    assert a[2:] == b[2:]
