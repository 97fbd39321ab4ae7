"""`zimage-lora serve` on a local Ray instance (loopback only): health, concurrent mixed-adapter
requests batched together with the images `generate` makes, and 4xx errors with their messages."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve (the [serve] extra) is not installed")

from _tiny_pipeline import save_tiny_pipeline, tiny_pipeline  # noqa: E402
from test_serving_core import same_image  # noqa: E402

from zimage_lora.examples import make_adapter  # noqa: E402
from zimage_lora.serving.core import ServeOptions  # noqa: E402
from zimage_lora.serving.launch import start, stop  # noqa: E402
from zimage_lora.tools.generate import generate  # noqa: E402

TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    model = save_tiny_pipeline(base / "model")
    root = base / "loras"
    root.mkdir()
    transformer = tiny_pipeline(0).transformer
    make_adapter("diffusers", root / "style.safetensors", transformer, seed=1)
    make_adapter("lycoris-lokr", root / "kr.safetensors", transformer, seed=2)
    # Ray's workers import zimage_lora too: give them this checkout's source by absolute path.
    src = str(Path(__file__).resolve().parents[1] / "src")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        options = ServeOptions(model=str(model), dtype="fp32", device="cpu", roots=[str(root)], max_batch_size=4,
                               batch_wait_timeout_s=0.5)
        url = start(options, host="127.0.0.1", port=free_port(), num_gpus=0, num_cpus=2, ready_timeout_s=TIMEOUT)
        try:
            yield url, model, root
        finally:
            stop()


def post(url: str, payload) -> tuple[int, bytes]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(f"{url}/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_health(server):
    url, _, _ = server
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        assert r.status == 200 and r.read() == b"ok"


def test_concurrent_mixed_requests_batch_and_match_generate(server, tmp_path):
    url, model, root = server
    bodies = [
        {"prompt": "a red cat", "seed": 1, "loras": [{"source": "style.safetensors", "strength": 0.8}]},
        {"prompt": "the sea", "seed": 2, "loras": [{"source": "kr.safetensors", "strength": 1.0}]},
        {"prompt": "a tree", "seed": 3, "loras": []},
        {"prompt": "a dog", "seed": 4, "loras": [{"source": "kr.safetensors", "strength": 0.5},
                                                 {"source": "style.safetensors", "strength": -1.0}]},
    ]
    for b in bodies:
        b.update(steps=2, width=32, height=32, guidance=0.0)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [f.result(timeout=TIMEOUT) for f in [pool.submit(post, url, b) for b in bodies]]
    pipe = tiny_pipeline(0)
    for b, (status, png) in zip(bodies, results, strict=True):
        assert status == 200, png[:300]
        out = tmp_path / f"{b['seed']}.png"
        loras = [f"{root / x['source']}:{x['strength']}" for x in b["loras"]]
        generate(b["prompt"], loras, out=out, steps=2, width=32, height=32, seed=b["seed"], dtype="fp32",
                 device="cpu", pipeline=pipe)
        same_image(png, out.read_bytes())
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as r:
        stats = json.loads(r.read())
    assert stats["largest_batch"] > 1, stats  # concurrent requests with different adapters shared a batch
    assert stats["store"]["host_misses"] == 2


def test_bad_requests_get_4xx_with_the_message(server):
    url, _, _ = server
    cases = [
        (b"{not json", 400, "not JSON"),
        ({"prompt": "x", "steps": 0}, 400, "'steps'"),
        ({"prompt": "x", "steps": 1, "width": 32, "height": 32, "loras": [{"source": "/etc/passwd"}]}, 403,
         "outside the allowed"),
        ({"prompt": "x", "steps": 1, "width": 32, "height": 32, "loras": [{"source": "../model/x.safetensors"}]},
         403, "outside the allowed"),
        ({"prompt": "x", "steps": 1, "width": 32, "height": 32, "loras": [{"source": "nope.safetensors"}]}, 404,
         "no such adapter"),
    ]
    for payload, code, message in cases:
        status, raw = post(url, payload)
        assert status == code, (payload, status, raw[:300])
        assert message in json.loads(raw)["error"]
    req = urllib.request.Request(f"{url}/generate")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 405


def test_cluster_config_in_the_docs_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from zimage_lora.serving.app import build_app

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "serve-config.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    built = build_app(app["args"])  # binds the deployment with its options; starts nothing
    assert type(built).__name__ == "Application"
