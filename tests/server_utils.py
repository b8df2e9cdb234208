"""Run the OpenAI-compatible server for tests: as a `pagedllm serve` subprocess or in a thread.

    with RemoteServer(model_path, ["--served-model-name", "tiny"]) as server:
        client = server.get_client()           # openai.OpenAI pointed at the server
        client.completions.create(model="tiny", prompt="Hello", max_tokens=4)

Both kinds listen on 127.0.0.1 on a free port and are stopped (bounded in time) on exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import httpx

from pagedllm.utils import get_open_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ServerBase:
    host = "127.0.0.1"
    port: int
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return self.url + "/" + "/".join(p.strip("/") for p in parts)

    def get_client(self, **kwargs: Any):
        import openai

        kwargs.setdefault("api_key", self.api_key or "EMPTY")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.url_for("v1"), **kwargs)

    def get_async_client(self, **kwargs: Any):
        import openai

        kwargs.setdefault("api_key", self.api_key or "EMPTY")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120)
        return openai.AsyncOpenAI(base_url=self.url_for("v1"), **kwargs)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stats(self) -> dict[str, Any]:
        r = httpx.get(self.url_for("stats"), headers=self.headers(), timeout=10)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll /stats until no request runs or waits; return the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["num_running"] == 0 and stats["num_waiting"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine still busy after {timeout}s: {stats}")
            time.sleep(0.05)


class RemoteServer(_ServerBase):
    """`python -m <module> [serve] MODEL --port P ...` in a subprocess.

    `module` is `pagedllm.entrypoints.cli` (the `pagedllm` command; `serve` is added) or
    `pagedllm.entrypoints.openai.api_server` (the model goes to `--model`).
    """

    def __init__(self, model: str | None, args: list[str] | None = None, *,
                 module: str = "pagedllm.entrypoints.cli", env: dict[str, str] | None = None,
                 api_key: str | None = None, startup_timeout: float = 180.0) -> None:
        self.port = get_open_port()
        self.api_key = api_key
        cmd = [sys.executable, "-m", module]
        if module.endswith(".cli"):
            cmd.append("serve")
            if model is not None:
                cmd.append(model)
        elif model is not None:
            cmd += ["--model", model]
        cmd += ["--host", self.host, "--port", str(self.port)] + list(args or [])
        self.cmd = cmd
        pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
        self._env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
        self._startup_timeout = startup_timeout
        self._log = tempfile.NamedTemporaryFile(prefix="pagedllm-server-", suffix=".log",
                                                delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._session: int | None = None  # the server's session (its pid) once stopped

    def __enter__(self) -> RemoteServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        # Its own session: stop() can end every process the server started (engine core,
        # API server processes, TP workers), even ones that outlive the server itself.
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self._env, cwd=REPO_ROOT, start_new_session=True)
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.stop()
                raise RuntimeError(f"server exited with {code}:\n{self.log()}")
            try:
                if httpx.get(self.url_for("health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server did not become healthy in time:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0, *,
             kill_leftovers: bool = True) -> int | None:
        """Send `sig`, wait for the exit (kill after `timeout`), return the exit code.

        Then every process left in the server's session is killed, unless `kill_leftovers`
        is False (for a test of what the server's own children do once it is gone; it calls
        `kill_session` when done)."""
        if self.proc is None:
            if kill_leftovers:
                self.kill_session()
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.returncode = self.proc.returncode
        self._session = self.proc.pid
        self.proc = None
        if kill_leftovers:
            self.kill_session()
        return self.returncode

    def kill_session(self) -> None:
        """SIGKILL whatever is left of the server's session: no stray process outlives its
        test."""
        if self._session is None:
            return
        try:
            os.killpg(self._session, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log(self) -> str:
        self._log.flush()
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()


class ThreadServer(_ServerBase):
    """A FastAPI app served by uvicorn in a background thread of this process."""

    def __init__(self, app: Any, api_key: str | None = None) -> None:
        import uvicorn

        self.port = get_open_port()
        self.api_key = api_key
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()  # the server's loop (call_soon_threadsafe)
        self.thread = threading.Thread(target=self._run, name="test-uvicorn", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
