"""Operator endpoints: `GET /metrics` (Prometheus text), `GET /dashboard` (a live page) and
`GET /dashboard/data` (the JSON it polls: queues, KV block map, throughput history).

`install_observability(app, engine, model_name)` gives the app its own Prometheus registry
and a throughput history, both fed with every engine step's stats through
`engine.stat_loggers`.
Engines without that hook (the pooling engine) still get the routes, with what
`get_stats()` tells.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from pagedllm.entrypoints.openai.errors import error_json
from pagedllm.metrics.loggers import ThroughputHistory
from pagedllm.metrics.prometheus import PrometheusStatLogger

DASHBOARD_PATH = "/dashboard"
# How long /dashboard/data waits for the engine core (busy with a long step, or dead).
ENGINE_CALL_TIMEOUT_S = 10.0
# Blocks drawn at most; larger pools are grouped into this many cells.
MAX_BLOCK_CELLS = 4096


class Observability:
    """Per-app state behind the operator endpoints."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.prometheus = PrometheusStatLogger(model_name)
        self.history = ThroughputHistory()
        loggers = getattr(engine, "stat_loggers", None)
        if loggers is not None:
            loggers.extend([self.prometheus, self.history])

    async def dashboard_data(self) -> dict[str, Any]:
        """Queues, KV usage, block map and history, read in the engine core between two
        steps where the engine has one."""
        view = getattr(self.engine, "dashboard_view", None)
        if view is not None:
            data = await asyncio.wait_for(view(MAX_BLOCK_CELLS), ENGINE_CALL_TIMEOUT_S)
        else:
            stats = self.engine.get_stats()
            data = {"num_running": stats.get("num_running", 0),
                    "num_waiting": stats.get("num_waiting", 0),
                    "kv_cache_usage": stats.get("kv_cache_usage", 0.0), "blocks": None}
        data.update(model=self.model_name, time=time.time(), history=self.history.samples())
        return data


def dashboard_html() -> str:
    """The dashboard page (static HTML + JS, shipped as package data)."""
    return (resources.files("pagedllm.entrypoints.openai") / "static" / "dashboard.html"
            ).read_text(encoding="utf-8")


def install_observability(app: FastAPI, engine: Any, model_name: str) -> Observability:
    """Add /metrics, /dashboard and /dashboard/data to `app`; returns their state."""
    obs = Observability(engine, model_name)
    app.state.observability = obs

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(raw_request: Request) -> Response:
        body, content_type = raw_request.app.state.observability.prometheus.render()
        return Response(body, media_type=content_type)

    @app.get(DASHBOARD_PATH, summary="Live dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(dashboard_html())

    @app.get(DASHBOARD_PATH + "/data", summary="Dashboard data (JSON)")
    async def dashboard_data(raw_request: Request) -> JSONResponse:
        try:
            return JSONResponse(await raw_request.app.state.observability.dashboard_data())
        except asyncio.TimeoutError:
            return error_json("The engine did not answer in time; try again.", 503)

    return obs
