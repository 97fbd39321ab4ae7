"""Shared fixtures: tiny Z-Image models built at test time (no files shipped)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from zimage_lora import examples

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is faster than several contending for two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the Hugging Face Hub fails the test."""
    from zimage_lora import sources

    def refuse(**kwargs):
        raise AssertionError(f"download attempted: {kwargs}")

    monkeypatch.setattr(sources, "_hf_hub_download", refuse)
    monkeypatch.setattr(sources, "_snapshot_download", refuse)


@pytest.fixture
def tiny():
    """A fresh tiny ZImageTransformer2DModel (dim 64, 2 layers, 1 refiner layer; 37 Linear layers)."""
    return examples.tiny_model(seed=0)


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", **examples.tiny_config()}))
    return path


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
