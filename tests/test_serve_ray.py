"""`zimage-lora serve` on a local Ray instance (loopback only): health, concurrent mixed-adapter
requests batched together with the images `generate` makes, 4xx errors with their messages, every
listening socket on loopback, API keys, 413 without reading, 503 when the queue is full, the OpenAI
route (the `openai` client), bad requests mixed into good ones, per-block strengths, schedules and
masks in a request, a forced 500, and a client that leaves while queued."""

from __future__ import annotations

import base64
import ipaddress
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
from test_serving_core import same_image  # noqa: E402

from zimage_lora.examples import make_adapter  # noqa: E402
from zimage_lora.serving.auth import key_hash  # noqa: E402
from zimage_lora.serving.core import ServeOptions  # noqa: E402
from zimage_lora.serving.launch import start, stop  # noqa: E402
from zimage_lora.tools.generate import generate  # noqa: E402

TIMEOUT = 120
KEY = "test-key-0123456789abcdef"
MAX_QUEUE = 4


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
                               batch_wait_timeout_s=0.5, max_queue=MAX_QUEUE, api_key_hashes=[key_hash(KEY)])
        url = start(options, host="127.0.0.1", port=free_port(), num_gpus=0, num_cpus=2, ready_timeout_s=TIMEOUT)
        try:
            yield url, model, root
        finally:
            stop()


def post(url: str, payload, key: str | None = KEY, full: bool = False):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{url}/generate", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            status, body, got = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, body, got = e.code, e.read(), e.headers
    return (status, body, got) if full else (status, body)


def get(url: str, path: str, key: str | None = KEY) -> bytes:
    req = urllib.request.Request(f"{url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


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
    stats = json.loads(get(url, "/stats"))
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
    req = urllib.request.Request(f"{url}/generate", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 405


def test_every_listening_socket_is_loopback(server):
    """Ray's GCS, raylet, object manager, agents, workers, the replica and the HTTP proxy: all of them,
    found as the listening sockets of this process and everything it started."""
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            found += [(proc.name(), c.laddr) for c in conns if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert len(found) >= 5, found  # GCS, raylet, proxy, controller, replica at least
    open_ones = []
    for name, (ip, port) in found:
        address = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            open_ones.append((name, ip, port))
    assert not open_ones, open_ones


def test_api_keys_and_request_ids(server):
    url, _, _ = server
    body = {"prompt": "x", "steps": 1, "width": 32, "height": 32}
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:  # open: load balancers probe it
        assert r.headers["X-Request-Id"]
    for key in (None, "wrong-key-0123456789abcdef"):
        status, raw, headers = post(url, body, key=key, full=True)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", raw
        answer = json.loads(raw)
        assert "API key" in answer["error"] and answer["request_id"] == headers["X-Request-Id"]
        assert KEY not in raw.decode()
    with pytest.raises(urllib.error.HTTPError) as info:
        get(url, "/stats", key="wrong-key-0123456789abcdef")
    assert info.value.code == 401
    status, raw, headers = post(url, body, full=True)
    assert status == 200 and headers["X-Request-Id"] and raw[:4] == b"\x89PNG"


def test_an_oversized_body_is_refused_from_its_length_without_reading(server):
    url, _, _ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /generate HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 60000000\r\n\r\n{".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:  # only the head: 59,999,999 body bytes were never sent
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_bad_requests_mixed_into_good_ones_fail_alone(server):
    url, _, _ = server
    good = [{"prompt": f"good {i}", "seed": i, "steps": 2, "width": 32, "height": 32,
             "loras": [{"source": "style.safetensors", "strength": 0.5}]} for i in range(2)]
    surrogate = json.dumps({"prompt": "\ud800", "steps": 2, "width": 32, "height": 32}).encode()
    overflow = {"prompt": "y", "steps": 2, "width": 32, "height": 32,
                "loras": [{"source": "style.safetensors", "strength": 1e39}]}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(post, url, b) for b in (good[0], surrogate, overflow, good[1])]
        results = [f.result(timeout=TIMEOUT) for f in futures]
    assert [status for status, _ in results] == [200, 400, 400, 200], [r[1][:200] for r in results]
    assert "surrogate" in json.loads(results[1][1])["error"] and "within" in json.loads(results[2][1])["error"]


def test_a_full_queue_answers_503_with_retry_after(server):
    url, _, _ = server
    body = {"prompt": "busy", "steps": 30, "width": 32, "height": 32}
    with ThreadPoolExecutor(max_workers=3 * MAX_QUEUE) as pool:
        futures = [pool.submit(post, url, {**body, "seed": i}, KEY, True) for i in range(3 * MAX_QUEUE)]
        results = [f.result(timeout=TIMEOUT) for f in futures]
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) == {200, 503} and statuses.count(200) >= MAX_QUEUE, statuses
    for status, raw, headers in results:
        if status == 503:
            assert int(headers["Retry-After"]) >= 1 and "busy" in json.loads(raw)["error"]
    time.sleep(0.5)
    assert json.loads(get(url, "/stats"))["pending"] == 0


def test_openai_client_gets_images(server):
    openai = pytest.importorskip("openai")
    url, _, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    result = client.images.generate(
        prompt="a lighthouse", n=2, size="32x32", response_format="b64_json",
        extra_body={"loras": [{"source": "style.safetensors", "strength": 0.8}], "steps": 2, "seed": 5},
    )
    pngs = [base64.b64decode(d.b64_json) for d in result.data]
    assert len(pngs) == 2 and all(p[:4] == b"\x89PNG" for p in pngs) and pngs[0] != pngs[1]  # seeds 5 and 6
    status, native = post(url, {"prompt": "a lighthouse", "seed": 6, "steps": 2, "width": 32, "height": 32,
                                "loras": [{"source": "style.safetensors", "strength": 0.8}]})
    assert status == 200
    same_image(pngs[1], native)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key-0123456789", max_retries=0).images.generate(prompt="x")
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="x", response_format="url", size="32x32")


def test_metrics(server):
    url, _, _ = server
    post(url, {"prompt": "counted", "steps": 1, "width": 32, "height": 32,
               "loras": [{"source": "style.safetensors", "strength": 0.3}]})
    text = get(url, "/metrics").decode()
    for name in ('zimage_requests_total{route="/generate",status="200"}', "zimage_request_seconds_bucket",
                 "zimage_batch_size_count", "zimage_queue_depth", 'zimage_store{stat="host_misses"}'):
        assert name in text, name
    with pytest.raises(urllib.error.HTTPError) as info:
        get(url, "/metrics", key=None)
    assert info.value.code == 401


def test_blocks_schedule_and_region_in_a_request_equal_the_python_api(server):
    from test_serving_strength import BLOCKS, SOFT, python_api

    url, _, root = server
    body = {"prompt": "two knights", "seed": 7, "steps": 3, "width": 32, "height": 32, "guidance": 0.0,
            "loras": [{"source": "style.safetensors", "strength": BLOCKS, "schedule": [[0, 1], [0.5, 0.2]]},
                      {"source": "kr.safetensors", "strength": 0.7, "region": {"mask": SOFT}}]}
    status, png = post(url, body)
    assert status == 200, png[:300]
    same_image(png, python_api(root, body))
    bad = {**body, "loras": [{"source": "style.safetensors", "strength": {"layer.0-1": 0.5}}]}
    status, raw = post(url, bad)
    assert status == 422 and "nearest: layers" in json.loads(raw)["error"], raw[:300]


def test_an_unexpected_error_answers_500_with_the_request_id_logged(server, capfd):
    """A fault injected into the replica (through Ray's `__ray_call__`, which runs a function inside the
    actor's process): the request that hits it gets JSON {"error", "request_id"} and 500, the id is the
    one in X-Request-Id, and the server's stderr (forwarded by Ray to this process) logs it."""
    import ray

    url, _, _ = server
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ZImageServer" in a["name"]]
    replicas = [ray.get_actor(name, namespace="serve") for name in names]  # the model replicas' actors

    def inject(_actor, on: bool) -> None:
        from zimage_lora.serving import core

        real = core.__dict__.setdefault("_real_generate_batch", core.generate_batch)

        def faulty(pipe, requests, **kwargs):
            requests = list(requests)
            if any(r.prompt == "inject a fault" for r in requests):
                raise RuntimeError("injected fault")
            return real(pipe, requests, **kwargs)

        core.generate_batch = faulty if on else real

    ray.get([r.__ray_call__.remote(inject, True) for r in replicas], timeout=30)
    try:
        body = {"prompt": "inject a fault", "steps": 1, "width": 32, "height": 32}
        status, raw, headers = post(url, body, full=True)
        ok, png = post(url, {**body, "prompt": "no fault"})
    finally:
        ray.get([r.__ray_call__.remote(inject, False) for r in replicas], timeout=30)
    assert ok == 200 and png[:4] == b"\x89PNG"
    answer = json.loads(raw)
    assert status == 500 and set(answer) == {"error", "request_id"}, raw[:300]
    rid = headers["X-Request-Id"]
    assert answer["request_id"] == rid and rid in answer["error"] and headers["Content-Type"] == "application/json"
    seen = ""
    for _ in range(100):  # Ray forwards the replica's stderr to the driver's within a few seconds
        seen += capfd.readouterr().err
        if f"request {rid} failed" in seen:
            break
        time.sleep(0.2)
    assert f"request {rid} failed" in seen and "injected fault" in seen


def test_a_client_that_disconnects_before_its_batch_starts_is_dropped(server):
    url, _, _ = server
    stats = lambda: json.loads(get(url, "/stats"))  # noqa: E731 - one replica: every call reaches it

    def wait_for(pending: int) -> None:
        for _ in range(300):
            if stats()["pending"] == pending:
                return
            time.sleep(0.05)
        raise AssertionError(f"the replica never held {pending} requests")

    before = stats()["requests"]
    host, port = url.removeprefix("http://").split(":")
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(post, url, {"prompt": "long", "steps": 50, "width": 128, "height": 128})
        wait_for(1)
        time.sleep(1.0)  # past the batch wait (0.5 s): the long request's batch has started
        data = json.dumps({"prompt": "gone", "steps": 1, "width": 32, "height": 32}).encode()
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"POST /generate HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            wait_for(2)  # queued behind the running batch
        assert not running.done()  # it left while the batch before it still ran
        assert running.result(timeout=TIMEOUT)[0] == 200
    wait_for(0)
    assert stats()["requests"] - before == 1  # the long request ran; the one that left never reached a batch
