"""A real uvicorn server on a kernel-assigned loopback port, in a background thread.

    with LiveServer(create_app(settings)) as server:
        httpx.get(server.url + "/health")
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn
from pathlib import Path

from fastapi import FastAPI


class LiveServer:
    """Binds the socket first (port 0), so no two tests can race for a port."""

    def __init__(self, app: FastAPI, *, ready_timeout: float = 240.0) -> None:
        self.app = app
        self.ready_timeout = ready_timeout
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Poll /health until 200 (models loaded); fail with its last answer after the timeout."""
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("server thread exited during start-up")
            try:
                response = httpx.get(self.url + "/health", timeout=5)
                if response.status_code == 200:
                    return
                last = response.text
                if response.json().get("status") == "failed":
                    break
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server not ready: {last}")

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        self._socket.close()


def serve_models(models: dict[str, Path], engine: str, **settings: object):
    """A LiveServer over the given checkpoints, each served as ``NAME:bf16``."""
    from steerserve.server.app import create_app
    from steerserve.server.settings import ServerSettings, VariantSpec

    specs = [VariantSpec(path=str(path), name=name) for name, path in models.items()]
    config = ServerSettings(models=specs, engine=engine, **{"max_model_len": 512, "kv_cache_gib": 1, **settings})
    return LiveServer(create_app(config))
