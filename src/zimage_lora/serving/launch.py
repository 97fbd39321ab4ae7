"""Start and stop the Ray Serve application from Python (the CLI's `serve` and the tests use this).

Closed by default: a local Ray instance (no `address`) binds every server it starts (GCS, raylet,
object manager, agents, workers) to 127.0.0.1 and starts no dashboard unless asked; only the HTTP
proxy listens on `host`. The model folder, the adapter roots and the port are checked before Ray
starts, so a typo is one `error:` line at once rather than a failed deployment half a minute later.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import AdapterNotFoundError, InvalidFormatError, LoRAError, UnsupportedError
from .core import ServeOptions

APP_NAME = "zimage-lora"
LOOPBACK = "127.0.0.1"


def _ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UnsupportedError("`zimage-lora serve` needs Ray Serve: pip install -e '.[serve]'.") from None
    return ray, serve


def check_model(model: str) -> None:
    """A pipeline folder (with model_index.json), or a hub id already in the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise AdapterNotFoundError(f"{model}: not a diffusers pipeline folder (no model_index.json) (--model).")
        return
    from ..sources import _HUB_ID

    if _HUB_ID.match(model):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            return
        raise AdapterNotFoundError(
            f"{model}: no such folder, and not in the Hugging Face cache (--model); download it once with "
            f"`hf download {model}`, or pass the pipeline folder."
        )
    raise AdapterNotFoundError(f"{model}: no such pipeline folder (--model).")


def check_port(host: str, port: int) -> None:
    """The HTTP address is free (the proxy would otherwise fail inside Ray, with a traceback)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds it
            s.bind((host, port))
    except OSError as exc:
        raise InvalidFormatError(
            f"{host}:{port}: cannot listen there ({exc.strerror or exc}); choose another --port or --host."
        ) from None


def preflight(options: ServeOptions, host: str, port: int, *, local: bool = True) -> None:
    """Everything checkable before Ray starts (local checks only for a local instance)."""
    for root in options.roots:
        if not Path(root).expanduser().is_dir():
            raise AdapterNotFoundError(f"{root}: adapter root is not a folder (--lora-root).")
    if local:
        check_model(options.model)
        check_port(host, port)


def _init_local(ray: Any, num_cpus: int | None, dashboard: bool) -> None:
    """A local Ray instance bound to loopback. Ray turns a node IP of 127.0.0.1 into the machine's
    routable address (so other nodes could join) unless clustering is off: switch it off for this
    driver and, through the environment, for the processes it starts."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address="local",  # always a new instance: never attach to whatever cluster this machine runs
        num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=dashboard, dashboard_host=LOOPBACK,
        log_to_driver=True,  # the replicas' own error lines (with request ids) reach this process's stderr
        logging_level="WARNING", configure_logging=True,
    )


def start(
    options: ServeOptions,
    *,
    host: str = LOOPBACK,
    port: int = 8000,
    replicas: int = 1,
    num_gpus: float | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool = False,
    ready_timeout_s: float = 300.0,
) -> str:
    """Run the app on Ray (a new local instance unless `address` names a cluster); returns its URL
    once `GET /health` answers 200."""
    preflight(options, host, port, local=address is None)
    ray, serve = _ray()
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not "connecting", "ready", ... on the console
    from .app import build_app

    if not ray.is_initialized():
        if address is None:
            _init_local(ray, num_cpus, dashboard)
        else:
            ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    args: dict[str, Any] = {**asdict(options), "replicas": replicas}
    if num_gpus is not None:
        args["num_gpus"] = num_gpus
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False,
                  logging_config={"log_level": "WARNING"})
    except Exception as exc:  # a replica's constructor failed (bad model folder, ...): Ray wraps it
        raise LoRAError(f"the server did not start: {str(exc).strip().splitlines()[-1][:500]}") from None
    url = f"http://{LOOPBACK if host in ('0.0.0.0', '::') else host}:{port}"
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


def _busy(serve: Any, deployment: str, timeout_s: float) -> bool:
    """Whether any replica of `deployment` still holds a request (a call reaches one replica at
    random, so ask until every replica has answered idle, or `timeout_s` passes)."""
    handle = serve.get_deployment_handle(deployment, APP_NAME)
    replicas = max(1, sum(serve.status().applications[APP_NAME].deployments[deployment].replica_states.values()))
    idle: dict[str, bool] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replica, held = handle.busy.remote().result(timeout_s=timeout_s)
        idle[replica] = held == 0
        if len(idle) >= replicas and all(idle.values()):
            return False
        time.sleep(0.05)
    return True


def drain(timeout_s: float = 60.0) -> None:
    """Wait (at most `timeout_s`) until no replica holds a request: requests in flight finish
    before the proxy and the replicas go away."""
    ray, serve = _ray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            left = deadline - time.monotonic()
            if not _busy(serve, "ZImageIngress", left) and not _busy(serve, "ZImageServer", left):
                return
    except Exception:  # noqa: BLE001 - no app (it never started) or a replica gone: nothing to wait for
        return


def stop(drain_timeout_s: float = 0.0) -> None:
    """Let the requests in flight finish (up to `drain_timeout_s`), then shut down Serve and the
    local Ray instance."""
    ray, serve = _ray()
    if ray.is_initialized():
        if drain_timeout_s > 0:
            drain(drain_timeout_s)
        serve.shutdown()
        ray.shutdown()
