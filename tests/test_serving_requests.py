"""Each request fails alone, with a 4xx it caused and never a 500: hostile bodies refused before they
join a batch, a failed lease leaves no pin, and a failure inside a batch reaches only its culprits."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _tiny_pipeline import tiny_pipeline
from test_serving_core import pixels

import zimage_lora as zl
from zimage_lora.batch import LIMITS, Request
from zimage_lora.examples import make_adapter
from zimage_lora.serving.auth import authorized, key_hash, load_key_hashes
from zimage_lora.serving.core import Engine, InternalError, ServeOptions, http_status
from zimage_lora.serving.parse import BodyTooLargeError, Job, load_json, parse_job, parse_openai
from zimage_lora.store_loader import OutsideRootsError, UnsafeFileTypeError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    make_adapter("diffusers", root / "style.safetensors", tiny_pipeline(0).transformer, seed=1)
    (root / "old.ckpt").write_bytes(b"\x80\x04N.")  # a pickle: must never be opened
    return root


@pytest.fixture(scope="module")
def engine(root):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(ServeOptions(model="tiny", dtype="fp32", device="cpu", roots=[str(root)]), tiny_pipeline(0))
    torch.set_num_threads(threads)


def small(prompt: str = "a cat", seed: int = 1, loras=()) -> dict:
    return {"prompt": prompt, "seed": seed, "steps": 2, "width": 32, "height": 32,
            "loras": [{"source": s, "strength": w} for s, w in loras]}


@pytest.mark.parametrize(("raw", "message"), [
    (b"[" * 20_000 + b"]" * 20_000, "nests 20000 levels"),  # RecursionError in json without the pre-count
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "5000 characters"),  # Python's int-digit limit
    (b'{"prompt": "x", "guidance": NaN}', "not a JSON number"),
    (b"\xff\xfe{", "not JSON"),
    (b" " * (70 * 1024), "larger than"),
])
def test_hostile_json_is_a_400(raw, message):
    with pytest.raises(zl.InvalidFormatError, match=message) as info:
        load_json(raw)
    assert http_status(info.value) == (413 if message == "larger than" else 400)
    assert isinstance(info.value, BodyTooLargeError) == (message == "larger than")
    assert load_json(b'{"a": ["[", {"b": "]]]]"}]}') == {"a": ["[", {"b": "]]]]"}]}  # brackets in strings


@pytest.mark.parametrize(("body", "message"), [
    ({"prompt": "\ud800 a cat"}, "lone surrogate"),
    ({"prompt": "x", "negative_prompt": "\udfff"}, "lone surrogate"),
    ({"prompt": "x", "loras": [{"source": "a" * 300 + ".safetensors"}]}, "too long"),
    ({"prompt": "x", "loras": [{"source": "x/" * 600}]}, "too long"),
    ({"prompt": "x", "loras": [{"source": "st\udc80yle.safetensors"}]}, "lone surrogate"),
    ({"prompt": "x", "loras": [{"source": "style.safetensors", "strength": 1e39}]}, "within"),
    ({"prompt": "x", "loras": [{"source": "style.safetensors", "strength": -1e37}]}, "within"),
    ({"prompt": "x", "width": 40}, "multiple of 16"),
    ({"prompt": "x", "steps": LIMITS.max_steps + 1}, "'steps'"),
    ({"prompt": "x", "\ud800": 1}, "unknown fields"),
])
def test_every_field_is_checked_before_the_batch(body, message):
    with pytest.raises(zl.InvalidFormatError, match=message) as info:
        parse_job(body)
    json.dumps({"error": str(info.value)}).encode("utf-8")  # the message itself can be sent


def test_one_set_of_limits_for_serve_and_generate_batch():
    pipe = tiny_pipeline(0)
    too_many_steps = Request("x", steps=LIMITS.max_steps + 1, width=32, height=32)
    with pytest.raises(zl.InvalidFormatError, match="steps must be in"):
        zl.generate_batch(pipe, [too_many_steps])
    with pytest.raises(zl.InvalidFormatError, match="'steps' must be in"):
        parse_job({"prompt": "x", "steps": LIMITS.max_steps + 1})
    for side in (LIMITS.max_side + 16, 40):
        with pytest.raises(zl.InvalidFormatError, match="width"):
            zl.generate_batch(pipe, [Request("x", steps=1, width=side, height=32)])
        with pytest.raises(zl.InvalidFormatError, match="width"):
            parse_job({"prompt": "x", "width": side})


def test_sources_policy_answers(root, engine):
    store = engine.store
    cases = {"old.ckpt": (UnsafeFileTypeError, 415), "/etc/passwd": (OutsideRootsError, 403),
             "org/some-lora": (zl.AdapterNotFoundError, 404)}
    for source, (kind, status) in cases.items():
        with pytest.raises(kind) as info:
            store.key(source)
        assert http_status(info.value) == status
    with pytest.raises(zl.AdapterNotFoundError, match="--allow-hub"):
        store.key("org/some-lora")


def test_a_failed_lease_leaves_no_pin(root):
    """A good source followed by one the OS refuses: nothing stays pinned, the budget holds."""
    store = zl.AdapterStore(tiny_pipeline(0), host_budget_bytes=1, roots=[root], allow_hub=False)
    for _ in range(3):
        lease = store.lease(["style.safetensors", "b" * 300])
        assert set(lease.errors) == {"b" * 300} and "too long" in str(lease.errors["b" * 300])
        lease.close()
    original = store._acquire
    store._acquire = lambda s: original(s) if s == "style.safetensors" else (_ for _ in ()).throw(OSError("disk"))
    with pytest.raises(OSError):
        store.lease(["style.safetensors", "other"])
    store._acquire = original
    assert all(e.pins == 0 for e in store._entries.values())
    assert store.stats().host_bytes <= 1  # unpinned, so evicted down to the budget


def test_failures_inside_a_batch_reach_only_their_requests(engine, monkeypatch, caplog):
    """Jobs that skip the validator (as a library caller may build them): a lone-surrogate prompt, an
    overflowing strength, and a prompt the pipeline itself chokes on, mixed into good requests."""
    good = [parse_job(small("a red cat", 1, [("style.safetensors", 0.8)]), "good-1"),
            parse_job(small("the sea", 2), "good-2")]
    surrogate = Job(Request("\ud800", 3, 2, 32, 32), (), "bad-surrogate")
    overflow = Job(Request("a dog", 4, 2, 32, 32), (("style.safetensors", 1e39),), "bad-overflow")
    crash = Job(Request("boom", 5, 2, 32, 32), (), "bad-crash")
    encode = engine.pipe.encode_prompt

    def choke(prompt, *args, **kwargs):  # a bug deep in the pipeline, for one prompt only
        if "boom" in (prompt if isinstance(prompt, list) else [prompt]):
            raise TypeError("tokenizer exploded")
        return encode(prompt, *args, **kwargs)

    monkeypatch.setattr(engine.pipe, "encode_prompt", choke)
    alone = [engine.run([job])[0] for job in good]
    with caplog.at_level(logging.ERROR, logger="zimage_lora.serving"):
        results = engine.run([good[0], surrogate, overflow, good[1], crash])
    assert isinstance(results[1], zl.InvalidFormatError) and "surrogate" in str(results[1])
    assert isinstance(results[2], zl.InvalidFormatError) and "within" in str(results[2])
    assert isinstance(results[4], InternalError) and http_status(results[4]) == 500
    assert "bad-crash" in str(results[4]) and "bad-crash" in caplog.text and "tokenizer exploded" in caplog.text
    for got, ref in zip((results[0], results[3]), alone, strict=True):
        assert isinstance(got, bytes)
        assert abs(pixels(got) - pixels(ref)).max() <= 1
    assert engine.stats()["retried_batches"] >= 1


def test_openai_shape():
    jobs = parse_openai({"prompt": "a fox", "n": 3, "size": "32x48", "response_format": "b64_json",
                         "model": "any", "loras": [{"source": "style.safetensors", "strength": 0.5}], "seed": 7})
    assert [j.request.seed for j in jobs] == [7, 8, 9]
    assert {(j.request.width, j.request.height) for j in jobs} == {(32, 48)}
    assert all(j.loras == (("style.safetensors", 0.5),) for j in jobs)
    for body, message in [({"prompt": "x", "response_format": "url"}, "b64_json"), ({"prompt": "x", "n": 99}, "'n'"),
                          ({"prompt": "x", "size": "big"}, "'size'"), ({"prompt": "x", "size": "40x40"}, "multiple")]:
        with pytest.raises(zl.InvalidFormatError, match=message):
            parse_openai(body)


def test_api_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("ZIMAGE_LORA_API_KEYS", raising=False)
    assert load_key_hashes() == [] and authorized(None, [])
    keys = tmp_path / "keys"
    keys.write_text("# operators\nk" * 1 + "0123456789abcdefXYZ\n\n")
    hashes = load_key_hashes(keys, {"ZIMAGE_LORA_API_KEYS": "second-key-0123456789, "})
    assert hashes == sorted({key_hash("k0123456789abcdefXYZ"), key_hash("second-key-0123456789")})
    assert "k0123456789abcdefXYZ" not in repr(hashes)  # only hashes travel to the replicas
    assert authorized("Bearer k0123456789abcdefXYZ", hashes) and authorized("bearer second-key-0123456789", hashes)
    for header in (None, "", "Bearer", "Bearer wrong-key-0123456789", "Basic k0123456789abcdefXYZ"):
        assert not authorized(header, hashes)
    keys.write_text("short\n")
    with pytest.raises(zl.InvalidFormatError, match="shorter than 16"):
        load_key_hashes(keys, {})


def test_a_replica_advertises_only_the_adapter_sets_its_store_holds(root):
    """The router's picture (Ray Serve's multiplexed ids of the replica) loses a set as soon as the
    store evicted one of its adapters; what the store still holds stays advertised."""
    pytest.importorskip("ray.serve", reason="Ray Serve (the [serve] extra) is not installed")
    from collections import OrderedDict
    from types import SimpleNamespace

    from zimage_lora.serving.replica import MULTIPLEX_ATTR, ZImageServer
    from zimage_lora.store import AdapterStore

    make_adapter("diffusers", root / "other.safetensors", tiny_pipeline(0).transformer, seed=2)
    store = AdapterStore(tiny_pipeline(0), roots=[str(root)], host_budget_bytes=None)
    replica = object.__new__(ZImageServer.func_or_class)  # the class Ray deploys, without a Ray context
    replica.engine = SimpleNamespace(store=store)
    replica.sets = {"held": ("style.safetensors",), "evicted": ("style.safetensors", "other.safetensors"),
                    "dropped by Ray": ("style.safetensors",)}
    wrapper = SimpleNamespace(models=OrderedDict(held=1, evicted=1, unknown=1), _push_multiplexed_replica_info=False)
    setattr(replica, MULTIPLEX_ATTR, wrapper)
    store.lease(["style.safetensors"]).close()  # in the host tier; "other" is not
    assert sorted(replica.advertise_held()) == ["evicted", "unknown"]
    assert list(wrapper.models) == ["held"] and list(replica.sets) == ["held"]
    assert wrapper._push_multiplexed_replica_info  # Ray pushes the shorter list to the routers
    store.lease(["other.safetensors"]).close()
    wrapper.models["evicted"] = 1
    replica.sets["evicted"] = ("style.safetensors", "other.safetensors")
    wrapper._push_multiplexed_replica_info = False
    assert replica.advertise_held() == [] and not wrapper._push_multiplexed_replica_info
