"""Start and stop the Ray Serve application from Python (the CLI's `serve` and the tests use this)."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import AdapterNotFoundError, LoRAError, UnsupportedError
from .core import ServeOptions

APP_NAME = "zimage-lora"


def _ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UnsupportedError("`zimage-lora serve` needs Ray Serve: pip install 'zimage-lora[serve]'.") from None
    return ray, serve


def start(
    options: ServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    num_gpus: float | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    ready_timeout_s: float = 300.0,
) -> str:
    """Run the app on Ray (a new local instance unless `address` names a cluster); returns its URL
    once `GET /health` answers 200."""
    ray, serve = _ray()
    from .app import build_app

    for root in options.roots:  # fail here, in one line, rather than in every replica's constructor
        if not Path(root).expanduser().is_dir():
            raise AdapterNotFoundError(f"{root}: adapter root is not a folder (--lora-root).")
    if not ray.is_initialized():
        local = address is None
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False,
            **({"num_cpus": num_cpus, "_node_ip_address": "127.0.0.1"} if local else {}),
        )
    serve.start(http_options={"host": host, "port": port})
    args: dict[str, Any] = {**asdict(options), "replicas": replicas}
    if num_gpus is not None:
        args["num_gpus"] = num_gpus
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:  # a replica's constructor failed (bad model folder, ...): Ray wraps it
        raise LoRAError(f"the server did not start: {str(exc).strip().splitlines()[-1][:500]}") from None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(0.2)
    raise LoRAError(f"the server at {url} did not answer /health within {ready_timeout_s:.0f} s.")


def stop() -> None:
    ray, serve = _ray()
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
