"""Observability: /metrics counters move by exactly what the requests did, the periodic log
line, /dashboard/data, and `pagedllm bench serve` against a live server.

One `pagedllm serve` subprocess (tiny random Llama, CPU) on 127.0.0.1 serves the module;
requests in a test run one after the other so that every count is known in advance.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import REPO_ROOT, RemoteServer

MODEL = "tiny-metrics"
BLOCK_SIZE = 16
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def model_path(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def server(model_path):
    with RemoteServer(model_path, [
        "--served-model-name", MODEL, "--device", "cpu", "--max-model-len", "256",
        "--num-gpu-blocks-override", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE),
        "--log-stats-interval", "0.5", "--disable-uvicorn-access-log",
    ]) as srv:
        yield srv


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    r = httpx.get(server.url_for("metrics"), timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    assert key in samples, f"{name}{labels} missing from /metrics"
    return samples[key]


def delta(before, after, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def complete(server, prompt: list[int], max_tokens: int, **extra) -> dict:
    r = httpx.post(server.url_for("v1/completions"), timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_counters_move_by_exact_amounts(server):
    before = scrape(server)
    prompt_a = list(range(100, 140))  # 40 tokens: 2 full blocks cacheable
    prompt_b = list(range(200, 220))  # 20 tokens
    prompt_c = list(range(300, 310))  # 10 tokens
    outs = [complete(server, prompt_a, 5, ignore_eos=True),
            complete(server, prompt_a, 5, ignore_eos=True),  # prefix hit: 32 tokens
            complete(server, prompt_b, 5, ignore_eos=True),
            # Only token 7 may be sampled and it is a stop token: 1 token, reason "stop".
            complete(server, prompt_c, 50, allowed_token_ids=[7], stop_token_ids=[7])]
    assert [o["choices"][0]["finish_reason"] for o in outs] == ["length"] * 3 + ["stop"]
    assert [o["usage"]["completion_tokens"] for o in outs] == [5, 5, 5, 1]
    server.wait_idle()
    after = scrape(server)

    p = "pagedllm:"
    assert delta(before, after, p + "prompt_tokens_total") == 40 + 40 + 20 + 10
    assert delta(before, after, p + "generation_tokens_total") == 16
    assert delta(before, after, p + "request_success_total", finished_reason="length") == 3
    assert delta(before, after, p + "request_success_total", finished_reason="stop") == 1
    assert delta(before, after, p + "request_success_total", finished_reason="abort") == 0
    assert delta(before, after, p + "prefix_cache_queries_total") == 110
    assert delta(before, after, p + "prefix_cache_hits_total") == 2 * BLOCK_SIZE
    assert delta(before, after, p + "num_preemptions_total") == 0
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds"):
        assert delta(before, after, p + hist + "_count") == 4, hist
        assert delta(before, after, p + hist + "_sum") >= 0, hist
    # The one-token request has no time per output token.
    assert delta(before, after, p + "time_per_output_token_seconds_count") == 3
    assert delta(before, after, p + "request_generation_tokens_sum") == 16
    assert delta(before, after, p + "request_prompt_tokens_sum") == 110
    assert value(after, p + "num_requests_running") == 0
    assert value(after, p + "num_requests_waiting") == 0
    assert value(after, p + "kv_cache_usage_perc") == 0.0


def test_abort_counts_once(server):
    """A client that leaves mid-stream aborts its request: counted once, as "abort" (a
    tiny model is fast, so the request may rarely finish first: then it counts as "length";
    of three tries at least one must abort)."""
    p = "pagedllm:"
    aborted = 0
    for _ in range(3):
        before = scrape(server)
        body = {"model": MODEL, "prompt": list(range(40, 48)), "max_tokens": 240,
                "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client, \
                client.stream("POST", server.url_for("v1/completions"), json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    break  # one token arrived: close the connection now
        server.wait_idle()
        after = scrape(server)
        n_abort = delta(before, after, p + "request_success_total", finished_reason="abort")
        n_length = delta(before, after, p + "request_success_total", finished_reason="length")
        assert n_abort + n_length == 1
        assert delta(before, after, p + "e2e_request_latency_seconds_count") == 1
        assert delta(before, after, p + "prompt_tokens_total") == 8
        generated = delta(before, after, p + "generation_tokens_total")
        assert generated == 240 if n_length else 1 <= generated < 240
        assert value(after, p + "num_requests_running") == 0
        aborted += int(n_abort)
        if aborted:
            break
    assert aborted == 1


def test_metrics_have_prefix_model_label_and_no_global_registry(server):
    from prometheus_client import REGISTRY

    samples = scrape(server)
    names = {name for name, _ in samples}
    assert all(n.startswith("pagedllm:") for n in names if not n.startswith(("python_",
                                                                              "process_")))
    assert all(dict(labels).get("model_name") == MODEL for _, labels in samples)
    # This test process built no app, and the server's app uses its own registry: nothing
    # of ours lands in prometheus_client's global one.
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("pagedllm:")]


def test_log_line_while_busy(server):
    complete(server, list(range(10, 30)), 30, ignore_eos=True)
    server.wait_idle()
    # The window that saw the request closes within an interval or two of going idle.
    deadline = time.monotonic() + 30
    while True:
        log = server.log()
        lines = [line for line in log.splitlines() if "Avg generation throughput" in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert lines, log[-2000:]
    assert "Running:" in lines[-1] and "KV cache usage" in lines[-1]
    assert "Prefix cache hit rate" in lines[-1]


def test_dashboard_page_and_data(server):
    from pagedllm.metrics.block_map import run_length_decode

    page = httpx.get(server.url_for("dashboard"), timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="block-map"' in page.text and "http" not in page.text.split("<script>")[1]
    data = httpx.get(server.url_for("dashboard/data"), timeout=10).json()
    assert data["model"] == MODEL
    assert data["num_running"] == 0 and data["num_waiting"] == 0
    blocks = data["blocks"]
    cells = run_length_decode(blocks["map"])
    assert len(cells) == blocks["num_blocks"] == NUM_BLOCKS
    assert set(cells) <= {"u", "f", "c"} and "u" not in cells  # idle: nothing in use
    assert cells.count("c") == blocks["cached_free"] > 0  # earlier prompts stay cached
    assert set(data["history"]) >= {"t", "prompt_tps", "generation_tps", "running"}


def _bench(server, model_path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve",
           "--base-url", server.url, "--tokenizer", model_path, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


@pytest.mark.parametrize("endpoint,extra", [
    ("completions", ["--max-concurrency", "2"]),
    ("chat", ["--request-rate", "50", "--random-range-ratio", "0.5"]),
])
def test_bench_serve_counts_match_server(server, model_path, tmp_path, endpoint, extra):
    before = scrape(server)
    result_file = tmp_path / "result.json"
    proc = _bench(server, model_path, "--endpoint", endpoint, "--num-prompts", "6",
                  "--random-input-len", "24", "--random-output-len", "4", "--ignore-eos",
                  "--seed", "3", "--save-result", "--result-file", str(result_file), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Output token throughput" in proc.stdout
    result = json.loads(result_file.read_text())
    server.wait_idle()
    after = scrape(server)
    assert result["model"] == MODEL  # discovered from /v1/models
    assert result["completed"] == 6 and result["failed"] == 0 and result["errors"] == []
    generated = delta(before, after, "pagedllm:generation_tokens_total")
    assert result["total_output_tokens"] == generated
    if "--random-range-ratio" not in extra:
        assert generated == 6 * 4
    assert result["output_tokens_from_usage"] == 6
    assert delta(before, after, "pagedllm:request_success_total", finished_reason="length") == 6
    for key in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            assert result[f"{stat}_{key}_ms"] >= 0
    assert result["mean_ttft_ms"] > 0 and result["output_throughput"] > 0
    if endpoint == "completions":
        # Prompts are made to their exact token length.
        assert result["total_input_tokens"] == 6 * 24
        assert delta(before, after, "pagedllm:prompt_tokens_total") == 6 * 24


def test_bench_serve_errors_are_clear(server, model_path, tmp_path):
    proc = _bench(server, model_path, "--num-prompts", "0")
    assert proc.returncode == 2 and "--num-prompts" in proc.stderr
    proc = _bench(server, model_path, "--dataset-name", "jsonl")
    assert proc.returncode == 2 and "needs --dataset-path" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    proc = _bench(server, model_path, "--dataset-name", "jsonl", "--dataset-path", str(bad))
    assert proc.returncode == 2 and "bad.jsonl:1" in proc.stderr
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve",
           "--base-url", "http://127.0.0.1:9", "--model", "x", "--tokenizer", model_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "cannot reach the server" in proc.stderr
    # Requests the server rejects are counted as failures with their message.
    good = tmp_path / "good.jsonl"
    good.write_text('"Hello there"\n{"prompt": "Hi", "output_len": 3}\n')
    result_file = tmp_path / "r.json"
    proc = _bench(server, model_path, "--dataset-name", "jsonl", "--dataset-path", str(good),
                  "--num-prompts", "2", "--model", "no-such-model", "--save-result",
                  "--result-file", str(result_file))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["failed"] == 2 and "HTTP 404" in result["errors"][0]


# ------------------------------------------------------------------------------- units
def test_bench_client_reads_sse_lines_of_any_length():
    """The client's line splitter rebuilds lines cut across reads, of any length."""
    import asyncio

    from pagedllm.benchmarks.serve import _sse_lines

    long = b"data: " + b"x" * 300_000
    body = b"data: 1\n\n" + long + b"\n\ndata: [DONE]\n\n"

    class Content:
        async def iter_any(self):
            for i in range(0, len(body), 7_001):
                yield body[i:i + 7_001]

    async def collect():
        return [line async for line in _sse_lines(Content())]

    lines = asyncio.run(collect())
    assert [line for line in lines if line] == [b"data: 1", long, b"data: [DONE]"]


def test_collector_and_prometheus_count_preemptions(tiny_llama):
    """Engine-level: with too few KV blocks requests get preempted; the counters equal the
    scheduler's, and token counts equal what the requests produced."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.metrics.prometheus import PrometheusStatLogger
    from pagedllm.metrics.stats import StatsCollector

    llm = LLM(tiny_llama, device="cpu", max_model_len=128, num_gpu_blocks_override=12,
              block_size=16, skip_tokenizer_init=True)
    engine = llm.engine
    assert isinstance(engine.stats, StatsCollector)  # the core always collects them
    prom = PrometheusStatLogger("m")
    params = SamplingParams(max_tokens=60, ignore_eos=True, detokenize=False)
    prompts = [list(range(10 + i, 50 + i)) for i in range(4)]
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), None, params, prompt_token_ids=ids)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        prom.record(engine.stats.snapshot(engine.scheduler), engine.stats.take(), 0.0)
        steps += 1
        assert steps < 2000
    preemptions = engine.scheduler.num_preemptions
    assert preemptions > 0
    reg = prom.registry
    labels = {"model_name": "m"}
    assert reg.get_sample_value("pagedllm:num_preemptions_total", labels) == preemptions
    assert reg.get_sample_value("pagedllm:generation_tokens_total", labels) == 4 * 60
    # Prompt tokens are counted once per request, not again after a preemption.
    assert reg.get_sample_value("pagedllm:prompt_tokens_total", labels) == 4 * 40
    assert reg.get_sample_value("pagedllm:request_success_total",
                                {**labels, "finished_reason": "length"}) == 4
    assert reg.get_sample_value("pagedllm:time_per_output_token_seconds_count", labels) == 4

    # An abort between steps: counted once with reason "abort", its tokens so far kept.
    engine.add_request("x", None, params, prompt_token_ids=prompts[0])
    for _ in range(3):
        engine.step()
    engine.abort_request("x")
    engine.step()  # nothing left to run
    prom.record(engine.stats.snapshot(engine.scheduler), engine.stats.take(), 0.0)
    assert reg.get_sample_value("pagedllm:request_success_total",
                                {**labels, "finished_reason": "abort"}) == 1
    assert reg.get_sample_value("pagedllm:generation_tokens_total", labels) == 4 * 60 + 3
    assert reg.get_sample_value("pagedllm:e2e_request_latency_seconds_count", labels) == 5
    assert reg.get_sample_value("pagedllm:num_requests_running", labels) == 0


def test_logging_stat_logger_busy_then_silent(caplog):
    from pagedllm.metrics.loggers import LoggingStatLogger
    from pagedllm.metrics.stats import IterationStats, SchedulerSnapshot

    def snap(running: int) -> SchedulerSnapshot:
        return SchedulerSnapshot(running, 0, 0.25, 100, 100, 50, 0)

    stat_logger = LoggingStatLogger(interval=1.0)
    caplog.set_level(logging.INFO, logger="pagedllm.metrics")
    stat_logger.record(snap(2), IterationStats(), 0.0)
    stat_logger.record(snap(2), IterationStats(num_prompt_tokens=30,
                                               num_generation_tokens=10), 0.5)
    assert not caplog.records  # the interval has not passed
    stat_logger.record(snap(2), IterationStats(num_generation_tokens=10), 2.0)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "Avg prompt throughput: 15.0 tokens/s" in msg
    assert "Avg generation throughput: 10.0 tokens/s" in msg
    assert "Running: 2 reqs" in msg and "KV cache usage: 25.0%" in msg
    for t in (3.5, 5.0, 6.5):  # idle: no more lines
        stat_logger.record(snap(0), IterationStats(), t)
    assert len(caplog.records) == 1
    with pytest.raises(ValueError, match="interval"):
        LoggingStatLogger(interval=0)


def test_block_map_encoding():
    from pagedllm.engine.kv_cache_manager import BlockPool
    from pagedllm.metrics.block_map import (
        block_map,
        group_states,
        run_length_decode,
        run_length_encode,
    )

    pool = BlockPool(10, enable_caching=True)
    taken = pool.get_new_blocks(4)  # blocks 0-3 in use
    pool.cache_block(taken[3], b"h3")
    pool.free_blocks([taken[3]])  # block 3: free but cached
    m = block_map(pool)
    assert run_length_decode(m["map"]) == "uuucffffff"
    assert (m["in_use"], m["cached_free"], m["free"]) == (3, 1, 6)
    assert run_length_encode(b"uuucffffff") == "u3c1f6"
    cells, per_cell = group_states(b"uuucffffff", max_cells=4)
    assert per_cell == 3 and cells == b"ucff"


def test_disable_log_stats_drops_only_the_log_line(tiny_llama):
    from pagedllm.config import EngineArgs
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.metrics.loggers import LoggingStatLogger

    def loggers(**kwargs) -> list:
        args = EngineArgs(model=tiny_llama, device="cpu", max_model_len=128,
                          num_gpu_blocks_override=16, **kwargs)
        engine = AsyncLLM(args.create_engine_config(), log_stats_interval=2.0)
        try:
            return list(engine.stat_loggers)
        finally:
            engine.shutdown()

    on = loggers()
    assert [type(x) for x in on] == [LoggingStatLogger] and on[0].period == 2.0
    assert loggers(disable_log_stats=True) == []


def test_bad_interval_and_throughput_flags_are_clear(model_path):
    cli = [sys.executable, "-m", "pagedllm.entrypoints.cli"]
    proc = subprocess.run(cli + ["serve", model_path, "--log-stats-interval", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "--log-stats-interval must be > 0" in proc.stderr
    proc = subprocess.run(cli + ["bench", "throughput", "--input-len", "5", "2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "--input-len MIN MAX needs" in proc.stderr
    proc = subprocess.run(cli + ["bench", "serve", "--max-concurrency", "-1"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "expected a positive integer" in proc.stderr


def test_api_key_leaves_only_the_dashboard_page_open(tiny_llama):
    import argparse

    from server_utils import ThreadServer

    from pagedllm.config import EngineArgs
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import build_app

    config = EngineArgs(model=tiny_llama, device="cpu", max_model_len=128,
                        num_gpu_blocks_override=16, disable_log_stats=True
                        ).create_engine_config()
    engine = AsyncLLM(config)
    try:
        app = build_app(engine, argparse.Namespace(api_key="sesame",
                                                   served_model_name=["keyed"]))
        with ThreadServer(app, api_key="sesame") as srv:
            assert httpx.get(srv.url_for("dashboard"), timeout=10).status_code == 200
            for path in ("dashboard/data", "metrics"):
                assert httpx.get(srv.url_for(path), timeout=10).status_code == 401
            data = httpx.get(srv.url_for("dashboard/data"), headers=srv.headers(),
                             timeout=10).json()
            assert data["model"] == "keyed" and data["blocks"]["num_blocks"] == 16
            text = httpx.get(srv.url_for("metrics"), headers=srv.headers(), timeout=10).text
            assert 'pagedllm:num_requests_running{model_name="keyed"} 0.0' in text
    finally:
        engine.shutdown()
