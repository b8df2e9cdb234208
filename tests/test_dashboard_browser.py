"""The live dashboard in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver` packages, driven by Selenium) opens /dashboard on a live server, requests
are sent, and the page shows requests running and KV blocks in use, then idle again.

Skipped, saying why, where Selenium, chromium or chromedriver is missing (`.ci/run` installs
them where apt-get works).
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest
from server_utils import RemoteServer

MODEL = "tiny-dashboard"
NUM_BLOCKS = 96
LOAD_THREADS = 6
LOAD_SECONDS = 90  # upper bound on the load, whatever happens


def _browser_paths() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver "
                    "(.ci/run does this where apt-get is available)")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,950"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def server(tiny_model_factory):
    with RemoteServer(tiny_model_factory("llama"), [
        "--served-model-name", MODEL, "--device", "cpu", "--max-model-len", "512",
        "--num-gpu-blocks-override", str(NUM_BLOCKS), "--disable-uvicorn-access-log",
    ]) as srv:
        yield srv


class _Load:
    """Threads streaming long completions back to back until stopped (bounded in time)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                        for i in range(LOAD_THREADS)]

    def _loop(self, i: int) -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                body = {"model": MODEL, "prompt": [(i * 37 + j) % 300 + 5 for j in range(60)],
                        "max_tokens": 400, "ignore_eos": True, "stream": True}
                self.sent += 1
                try:
                    with client.stream("POST", self.url, json=body) as resp:
                        for _ in resp.iter_lines():
                            if self.stop.is_set():
                                break
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def _state(drv) -> dict:
    """The page's numbers and block map, read in one script (so from one update)."""
    return drv.execute_script("""
        const t = (id) => document.getElementById(id).textContent;
        return {model: t("model"), running: t("running"), waiting: t("waiting"),
                "blocks-in-use": t("blocks-in-use"), status: t("status"), gen: t("gen-tps"),
                chart: document.getElementById("chart").innerHTML,
                map: document.getElementById("block-map").dataset.map || ""};""")


def _wait_for(drv, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = _state(drv)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"dashboard never showed {what}; last state: {state}")
        time.sleep(0.1)


def test_dashboard_shows_load(browser, server, tmp_path):
    from pagedllm.metrics.block_map import run_length_decode

    browser.get(server.url_for("dashboard") + "?interval=250")
    idle = _wait_for(browser, lambda s: s["model"] == MODEL and s["map"], 30, "first data")
    assert idle["running"] == "0" and idle["waiting"] == "0"
    assert "u" not in run_length_decode(idle["map"])
    assert len(run_length_decode(idle["map"])) == NUM_BLOCKS
    assert idle["blocks-in-use"] == f"0 / {NUM_BLOCKS}"

    with _Load(server.url_for("v1/completions")) as load:
        busy = _wait_for(browser, lambda s: s["running"] not in ("", "0")
                         and "u" in s["map"], 60, "running requests and blocks in use")
        # The history is sampled every 2 s: wait until the chart shows the load.
        charted = _wait_for(browser, lambda s: float(s["gen"] or 0) > 0
                            and "polyline" in s["chart"], 60, "generation throughput")
        browser.save_screenshot(str(tmp_path / "dashboard-busy.png"))
    assert not load.errors, load.errors[:3]
    assert int(busy["running"]) >= 1
    cells = run_length_decode(busy["map"])
    in_use = cells.count("u")
    assert in_use >= 1 and busy["blocks-in-use"] == f"{in_use} / {NUM_BLOCKS}"
    assert busy["map"] != idle["map"]

    after = _wait_for(browser, lambda s: s["running"] == "0" and s["map"]
                      and "u" not in s["map"], 60, "the engine idle again")
    # Finished requests leave their full blocks cached (green) for later prefix hits.
    assert "c" in run_length_decode(after["map"])
    assert after["blocks-in-use"] == f"0 / {NUM_BLOCKS}"
    assert "updated" in after["status"]
    assert "polyline" in charted["chart"] and float(charted["gen"]) > 0
    shot = tmp_path / "dashboard-busy.png"
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
