"""`zimage-lora serve` as an operator runs it: started in the background (SIGINT ignored, as a shell
starts `cmd &`), stopped with SIGTERM while a request is in flight: the request completes, the
process exits 0 without tracebacks or Ray's shutdown chatter. And the checks made before Ray starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve (the [serve] extra) is not installed")

from _tiny_pipeline import save_tiny_pipeline  # noqa: E402

from zimage_lora.cli import main  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caught_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigCgt line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_background_server_drains_on_sigterm_and_exits_0(tmp_path):
    model = save_tiny_pipeline(tmp_path / "model")
    (tmp_path / "loras").mkdir()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "zimage_lora.cli", "serve", "--model", str(model), "--lora-root",
           str(tmp_path / "loras"), "--port", str(port), "--dtype", "fp32", "--device", "cpu"]
    # As `cmd &` in a non-interactive shell: SIGINT ignored from the start.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()  # "serving on ..." once /health answers
        assert line.startswith("serving on"), (line, proc.stderr.read() if proc.poll() is not None else "")
        assert caught_signals(proc.pid) & (1 << (signal.SIGINT - 1))  # SIGINT handled, not ignored
        result: dict = {}

        def slow_request() -> None:
            body = json.dumps({"prompt": "x", "steps": 40, "width": 32, "height": 32}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body)
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                result["status"], result["png"] = r.status, r.read()

        thread = threading.Thread(target=slow_request)
        thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the request is in the replica
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
                if json.loads(r.read())["pending"]:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        thread.join(TIMEOUT)
        code = proc.wait(TIMEOUT)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result.get("status") == 200 and result["png"][:4] == b"\x89PNG"  # finished, not cut off
    assert code == 0, err[-2000:]
    assert "Traceback" not in err and "graceful_shutdown" not in err, err[-2000:]
    assert "stopping" in err


def test_checks_before_ray_starts_are_one_error_line(tmp_path, capsys):
    import ray

    model = save_tiny_pipeline(tmp_path / "model")
    (tmp_path / "loras").mkdir()
    capsys.readouterr()  # the fixture's own output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = [
            (["--model", str(tmp_path / "mistyped")], "no such pipeline folder"),
            (["--model", str(tmp_path / "loras")], "model_index.json"),
            (["--model", "org/not-cached-anywhere"], "not in the Hugging Face cache"),
            (["--model", str(model), "--port", str(busy.getsockname()[1])], "cannot listen there"),
            (["--model", str(model), "--api-key-file", str(tmp_path / "nokeys")], "API key file"),
        ]
        for args, message in cases:
            assert main(["serve", *args, "--lora-root", str(tmp_path / "loras")]) == 1
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not ray.is_initialized()  # nothing was started
