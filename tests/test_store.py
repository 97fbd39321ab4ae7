"""AdapterStore: loaded once per source, host and device LRU budgets, pins, per-source failures, threads."""

from __future__ import annotations

import copy
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import zimage_lora as zl
from zimage_lora.examples import make_adapter, run_model, tiny_inputs, tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    base = tiny_model(0)
    layouts = ["diffusers", "lycoris-lokr", "lycoris-loha", "diffusers", "lycoris-dora"]
    return folder, [make_adapter(lay, folder / f"a{i}.safetensors", base, seed=i + 1) for i, lay in enumerate(layouts)]


def nbytes(path) -> int:
    return zl.load_adapter(path, tiny_model(0)).nbytes()


def store_names(model) -> list[str]:
    return [a.name for a in zl.list_adapters(model) if a.name.startswith("store")]


def test_loaded_once_and_attached_once(files):
    folder, paths = files
    model = tiny_model(0)
    store = zl.AdapterStore(model)
    for _ in range(3):
        with store.lease([paths[0], str(paths[0])]) as lease:
            spec = lease.spec([(paths[0], 0.5)])
    s = store.stats()
    assert (s.host_misses, s.host_hits, s.device_misses, s.device_hits) == (1, 2, 1, 2)
    assert s.host_bytes == nbytes(paths[0]) and s.host_entries == 1 and s.device_entries == 1
    assert list(spec.values()) == [0.5]
    assert store_names(model) == list(spec)
    assert not any(a.active for a in zl.list_adapters(model)), "store adapters are attached inactive"


def test_host_budget_evicts_least_recently_used(files, tmp_path):
    _, paths = files
    extra = make_adapter("diffusers", tmp_path / "x.safetensors", tiny_model(0), seed=7)
    a, b, x = (os.path.realpath(p) for p in (paths[0], paths[3], extra))  # three LoRAs of one size
    one = nbytes(a)
    assert nbytes(b) == one == nbytes(x)
    store = zl.AdapterStore(tiny_model(0), host_budget_bytes=int(2.5 * one))
    for p in (a, b, a):
        store.lease([p]).close()  # loaded and released, never attached
    s = store.stats()
    assert (s.host_misses, s.host_hits, s.host_evictions) == (2, 1, 0)
    store.lease([x]).close()
    assert list(store._entries) == [a, x]  # b was the least recently used
    held = store.lease([a, x])
    extra_lease = store.lease([b])
    s = store.stats()
    assert s.host_entries == 3 and s.host_bytes == 3 * one  # over budget while all are pinned
    held.close()
    extra_lease.close()
    s = store.stats()
    assert s.host_bytes <= 2.5 * one and s.host_evictions == 2 and s.host_entries == 2


def test_device_budget_never_evicts_a_pinned_adapter(files):
    _, paths = files
    model = tiny_model(0)
    store = zl.AdapterStore(model, device_budget_bytes=1)  # at most what the running lease pins
    with store.lease(paths[:3]):
        assert len(store_names(model)) == 3  # over budget while pinned: nothing taken away
    with store.lease([paths[3]]):
        assert len(store_names(model)) == 1  # the three unpinned ones went, least recent first
    s = store.stats()
    assert s.device_evictions == 3 and s.device_entries == 1
    slots = [m for m in model.modules() if isinstance(m, zl.apply.AdapterLinear)]
    assert s.device_bytes == sum(getattr(sl, k).nbytes for w in slots for sl in w.slots.values() for k in sl.names)


def test_a_failing_source_fails_alone(files, tmp_path):
    folder, paths = files
    outside = make_adapter("diffusers", tmp_path / "outside.safetensors", tiny_model(0), seed=9)
    (folder / "link.safetensors").unlink(missing_ok=True)
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    model = tiny_model(0)
    store = zl.AdapterStore(model, roots=[folder], allow_hub=False)
    asked = ["a0.safetensors", "missing.safetensors", str(outside), "link.safetensors", "../" + outside.name,
             "bad.safetensors"]
    with store.lease(asked) as lease:
        assert isinstance(lease.errors["missing.safetensors"], zl.AdapterNotFoundError)
        for unsafe in (str(outside), "link.safetensors", "../" + outside.name):
            assert isinstance(lease.errors[unsafe], zl.UnsafeFileError), unsafe
        assert isinstance(lease.errors["bad.safetensors"], zl.LoRAError)
        assert lease.failure(["a0.safetensors"]) is None
        spec = lease.spec([("a0.safetensors", 1.0)])
        with pytest.raises(zl.UnsafeFileError):
            lease.spec([("a0.safetensors", 1.0), ("link.safetensors", 1.0)])
        with zl.per_sample_adapters(model, [spec]):
            run_model(model, tiny_inputs(1))
    assert store.stats().load_errors >= 1


def test_a_lease_holds_the_model_until_it_exits(files):
    _, paths = files
    store = zl.AdapterStore(tiny_model(0), device_budget_bytes=1)
    entered = threading.Event()

    def other():
        with store.lease([paths[1]]):
            entered.set()

    with store.lease([paths[0]]):
        t = threading.Thread(target=other, daemon=True)
        t.start()
        assert not entered.wait(0.3), "another lease attached (and could evict) while this one ran"
        name = store_names(store.model)
    entered.wait(10)
    t.join(10)
    assert entered.is_set() and name[0] not in store_names(store.model)


def test_concurrent_requests(files, one_torch_thread):
    _, paths = files
    model = tiny_model(0)
    inputs = tiny_inputs(1)
    refs = {}
    for p in paths:
        ref_model = copy.deepcopy(model)
        zl.apply_adapter(ref_model, p, scale=0.8)
        refs[str(p)] = run_model(ref_model, inputs)
    base = run_model(model, inputs)
    one = nbytes(paths[0])
    store = zl.AdapterStore(model, host_budget_bytes=3 * one, device_budget_bytes=2 * one)
    batch = {"x": inputs["x"] * 2, "t": inputs["t"].repeat(2), "cap_feats": inputs["cap_feats"] * 2}

    def job(seed: int) -> None:
        rng = random.Random(seed)
        pick = [str(p) for p in rng.sample(paths, 2)]
        with store.lease(pick) as lease:
            specs = [lease.spec([(p, 0.8)]) for p in pick]
            with zl.per_sample_adapters(model, specs), torch.no_grad():
                out = model(batch["x"], batch["t"], batch["cap_feats"], return_dict=False)[0]
        for o, p in zip(out, pick, strict=True):
            effect = (refs[p] - base).norm()
            assert float((o.float() - refs[p]).norm() / effect) < 1e-4, p

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(job, seed) for seed in range(24)]:
            future.result(timeout=60)
    s = store.stats()
    assert s.host_misses >= len(paths) and s.device_evictions > 0 and s.host_evictions > 0
    # Prepared LoHa/DoRA slots hold dense deltas (far above 2 LoRAs): only the last lease's pair may stay.
    assert s.device_entries <= 2 and all(e.pins == 0 for e in store._entries.values())
    store.clear()
    assert store_names(model) == [] and store.stats().device_entries == 0


def test_hub_ids_only_when_allowed(no_network):
    store = zl.AdapterStore(tiny_model(0), allow_hub=False)
    lease = store.lease(["org/some-lora"])
    assert isinstance(lease.errors["org/some-lora"], zl.AdapterNotFoundError)
    assert "not allowed" in str(lease.errors["org/some-lora"])
    lease.close()
    assert zl.AdapterStore(tiny_model(0)).key("org/some-lora") == "org/some-lora"  # allowed by default
