"""Two Ray nodes on this machine (a head and a worker, each its own raylet and ports, all on
127.0.0.1), the app deployed from docs/serve-config.yaml with one model replica per node: both
serve, requests for one adapter set stay on one replica (affinity), and when the worker node dies
mid-stream every request still gets an answer and the head replica goes on serving."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve (the [serve] extra) is not installed")

from _tiny_pipeline import save_tiny_pipeline, tiny_pipeline  # noqa: E402

from zimage_lora.examples import make_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=data), timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:  # the connection itself failed: an answer too (an error), not a hang
        return -1, str(e).encode()


def replica_stats(url: str, replicas: int) -> dict[str, dict]:
    """The /stats of every model replica (one call reaches one replica, at random)."""
    seen: dict[str, dict] = {}
    for _ in range(60):
        stats = json.loads(call(url, "/stats")[1])
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            break
    return seen


def test_two_nodes_serve_and_fail_over(tmp_path):
    import ray
    import yaml
    from ray import serve
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from zimage_lora.serving.app import build_app

    model = save_tiny_pipeline(tmp_path / "model")
    (tmp_path / "loras").mkdir()
    for i in range(2):
        make_adapter("diffusers", tmp_path / "loras" / f"s{i}.safetensors", tiny_pipeline(0).transformer, seed=i + 1)
    config = yaml.safe_load((ROOT / "docs" / "serve-config.yaml").read_text())
    args = dict(config["applications"][0]["args"])
    args.pop("api_key_file")
    args.update(model=str(model), roots=[str(tmp_path / "loras")], replicas=2, num_gpus=0, num_cpus=1, dtype="fp32",
                device="cpu", host_budget_bytes=1 << 26, device_budget_bytes=1 << 26, batch_wait_timeout_s=0.01)
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # nodes on 127.0.0.1, not the routable address
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "object_store_memory": 80 << 20})
        worker = cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            serve.run(build_app(args), name="zimage-lora", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            stats = replica_stats(url, 2)
            assert {s["node"] for s in stats.values()} == {cluster.head_node.node_id, worker.node_id}  # one each
            body = {"prompt": "x", "steps": 2, "width": 32, "height": 32,
                    "loras": [{"source": "s0.safetensors", "strength": 0.5}]}
            for source in ("s0.safetensors", "s1.safetensors"):  # affinity: each set read by one replica only
                one = {**body, "loras": [{"source": source, "strength": 0.5}]}
                assert call(url, "/generate", one)[0] == 200
                time.sleep(2)  # the replica's new adapter set reaches the routers
                assert [call(url, "/generate", {**one, "seed": i})[0] for i in range(6)] == [200] * 6
            misses = [s["store"]["host_misses"] for s in replica_stats(url, 2).values()]
            assert sum(misses) == 2, misses  # s0 and s1 once each, whichever replica took them
            with ThreadPoolExecutor(max_workers=3) as pool:
                futures = [pool.submit(call, url, "/generate", {**body, "seed": i}) for i in range(24)]
                cluster.remove_node(worker, allow_graceful=False)  # the worker node dies mid-stream
                statuses = [f.result(timeout=2 * TIMEOUT)[0] for f in futures]
            assert all(s == 200 or s >= 500 or s == -1 for s in statuses), statuses  # each answered, or an error
            deadline = time.monotonic() + TIMEOUT  # Serve notices the dead replicas
            while call(url, "/generate", body)[0] != 200 and time.monotonic() < deadline:
                time.sleep(1)
            after = [call(url, "/generate", {**body, "seed": 100 + i})[0] for i in range(6)]
            assert after == [200] * 6, after  # the head node's replica serves on
            assert {json.loads(call(url, "/stats")[1])["node"] for _ in range(6)} == {cluster.head_node.node_id}
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()


def test_cluster_config_in_the_docs_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from zimage_lora.serving.app import build_app

    doc = yaml.safe_load((ROOT / "docs" / "serve-config.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    built = build_app(app["args"])  # binds the deployment with its options; starts nothing
    assert type(built).__name__ == "Application"
