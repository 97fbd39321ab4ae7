"""Where adapters come from: files, folders, PEFT folders, hub ids (download mocked), refusals."""

from __future__ import annotations

import json

import pytest

from zimage_lora import (
    AdapterNotFoundError,
    AmbiguousSourceError,
    DownloadError,
    LoRAConfiguration,
    UnsafeFileError,
    examples,
    load_adapter,
    sources,
)


@pytest.fixture
def kohya_file(tmp_path, tiny):
    return examples.make_adapter("kohya", tmp_path / "style.safetensors", tiny)


def test_file_and_folder_with_one_file(kohya_file, tiny):
    assert len(load_adapter(kohya_file, tiny).targets) == 37
    adapter = load_adapter(kohya_file.parent, tiny)
    assert adapter.source == str(kohya_file) and adapter.name == "style"


def test_folder_with_several_files_is_ambiguous_unless_named(tmp_path, tiny, kohya_file):
    examples.make_adapter("ai-toolkit", tmp_path / "other.safetensors", tiny)
    with pytest.raises(AmbiguousSourceError, match="other.safetensors.*style.safetensors|filename"):
        load_adapter(tmp_path, tiny)
    assert load_adapter(tmp_path, tiny, filename="other.safetensors").format == "ai-toolkit"
    assert load_adapter(LoRAConfiguration(tmp_path, filename="style.safetensors"), tiny).format == "kohya"


def test_peft_folder_uses_its_config(tmp_path, tiny):
    folder = examples.make_adapter("peft", tmp_path / "my_peft", tiny, rank=4, alpha=8)
    adapter = load_adapter(folder, tiny)
    assert adapter.name == "my_peft" and adapter.format == "peft"
    assert {t.scale for t in adapter.targets} == {2.0}


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_refused_without_opening(tmp_path, tiny, suffix):
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFileError, match="safetensors"):
        load_adapter(path, tiny)
    with pytest.raises(UnsafeFileError):
        load_adapter(tmp_path, tiny)  # a folder holding only pickle files


def test_missing_path_says_what_was_tried(tmp_path, tiny):
    with pytest.raises(AdapterNotFoundError, match="no such file"):
        load_adapter(tmp_path / "nope.safetensors", tiny)


def test_hub_id_goes_through_huggingface_hub(monkeypatch, tmp_path, tiny, kohya_file):
    calls = []

    def fake_snapshot(**kwargs):
        calls.append(kwargs)
        return str(kohya_file.parent)

    def fake_file(**kwargs):
        calls.append(kwargs)
        return str(kohya_file)

    monkeypatch.setattr(sources, "_snapshot_download", fake_snapshot)
    monkeypatch.setattr(sources, "_hf_hub_download", fake_file)
    assert len(load_adapter("some-org/zimage-style", tiny).targets) == 37
    assert calls[-1]["repo_id"] == "some-org/zimage-style" and "*.safetensors" in calls[-1]["allow_patterns"]
    load_adapter("some-org/zimage-style", tiny, filename="style.safetensors", revision="v2")
    assert calls[-1] == {"repo_id": "some-org/zimage-style", "filename": "style.safetensors", "revision": "v2"}


def test_hub_offline_error_says_how_to_fix(monkeypatch, tmp_path, tiny):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DownloadError, match="hf download|local path"):
        load_adapter("some-org/not-cached", tiny, filename="x.safetensors")


def test_hub_cache_layout_offline(monkeypatch, tmp_path, tiny, kohya_file):
    """A cache laid out as huggingface_hub lays it out resolves with the Hub unreachable."""
    cache = tmp_path / "hub"
    repo = cache / "models--some-org--cached-style"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "style.safetensors").write_bytes(kohya_file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    adapter = load_adapter("some-org/cached-style", tiny, filename="style.safetensors")
    assert len(adapter.targets) == 37


def test_config_json_of_peft_folder_must_be_json(tmp_path, tiny):
    folder = examples.make_adapter("peft", tmp_path / "p", tiny)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(Exception) as info:
        load_adapter(folder, tiny)
    assert "adapter_config.json" in str(info.value)
    assert json  # keeps the import honest for readers: config is JSON
