"""Bad inputs through the Hugging Face Hub: offline with an empty cache the error says how to fix it; a
cached repo resolves offline to the same adapter as the file on disk; a filename that escapes the repo
never reaches the download; a download that hands back a pickle is refused. The model is untouched."""

from __future__ import annotations

import pytest
import torch
from _hostile import (
    assert_untouched,
    hub_cache,
    pickle_file,
    state_bits,
)

from zimage_lora import (
    DownloadError,
    LoRAConfiguration,
    UnsafeFileError,
    examples,
    load_adapter,
    sources,
)


@pytest.fixture(scope="module")
def model():
    return examples.tiny_model(seed=0)


@pytest.fixture(scope="module")
def pristine(model):
    return state_bits(model)


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # The real huggingface_hub functions, not the test's refusal stand-ins.
    monkeypatch.setattr(sources, "_hf_hub_download", lambda **kw: __import__("huggingface_hub").hf_hub_download(**kw))
    monkeypatch.setattr(sources, "_snapshot_download",
                        lambda **kw: __import__("huggingface_hub").snapshot_download(**kw))
    return cache


@pytest.mark.parametrize("filename", [None, "lora.safetensors"])
def test_hub_offline_empty_cache_says_how_to_fix(offline_cache, model, pristine, filename):
    with pytest.raises(DownloadError) as info:
        load_adapter("someorg/some-lora", model, filename=filename)
    msg = str(info.value)
    assert "someorg/some-lora" in msg
    assert "hf download someorg/some-lora" in msg and "HF_HUB_CACHE" in msg
    assert_untouched(model, pristine)


@pytest.mark.parametrize("filename", [None, "lora.safetensors"])
def test_hub_cache_layout_resolves_offline(offline_cache, model, tmp_path, filename):
    local = examples.make_adapter("ai-toolkit", tmp_path / "local.safetensors", model,
                                  targets=["layers.0.attention.to_q", "layers.1.feed_forward.w2"])
    hub_cache(offline_cache, "someorg/some-lora", {"lora.safetensors": local.read_bytes()})
    from_hub = load_adapter("someorg/some-lora", model, filename=filename)
    from_disk = load_adapter(local, model)
    assert from_hub.modules == from_disk.modules == ["layers.0.attention.to_q", "layers.1.feed_forward.w2"]
    for a, b in zip(from_hub.targets, from_disk.targets, strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert "models--someorg--some-lora" in from_hub.source


def test_hub_escape_never_calls_download(model, monkeypatch):
    calls = []
    monkeypatch.setattr(sources, "_hf_hub_download", lambda **kw: calls.append(kw) or "/etc/passwd")
    for bad in ["../x.safetensors", "a/../../x.safetensors", "/abs/x.safetensors", "..\\x.safetensors"]:
        with pytest.raises(UnsafeFileError, match="points outside"):
            load_adapter(LoRAConfiguration("org/name", filename=bad), model)
    assert calls == []


def test_hub_download_returning_pickle_is_refused(model, tmp_path, monkeypatch):
    # Even if the download layer hands back a pickle path, it is refused by suffix before reading.
    path = pickle_file(tmp_path / "weights.ckpt", tmp_path / "MARKER")
    monkeypatch.setattr(sources, "_hf_hub_download", lambda **kw: str(path))
    with pytest.raises(UnsafeFileError):
        load_adapter(LoRAConfiguration("org/name", filename="weights.safetensors"), model)
    assert not (tmp_path / "MARKER").exists()
