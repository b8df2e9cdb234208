"""Speculative decoding through `pagedllm serve --speculative-config`: the openai client's
greedy completions equal a server's without speculation, and /metrics and the stats log
line report the drafts, the accepted tokens (per position) and the mean acceptance length."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import RemoteServer

MODEL = "tiny-spec"
ARGS = ["--served-model-name", MODEL, "--device", "cpu", "--max-model-len", "256",
        "--log-stats-interval", "0.5", "--disable-uvicorn-access-log"]
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
PROMPTS = [[11, 12, 13, 14, 15, 16, 17] * 5, list(range(40, 60)) * 3]


def _complete(client) -> list[list[str]]:
    texts = []
    for prompt in PROMPTS:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40,
                                      temperature=0.0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 40
        texts.append(r.choices[0].text)
    return texts


def _samples(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url_for("metrics"), timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _spec(samples, name: str, **labels: str) -> float:
    key = (f"pagedllm:spec_decode_{name}", tuple(sorted({"model_name": MODEL,
                                                         **labels}.items())))
    assert key in samples, f"{key} missing from /metrics"
    return samples[key]


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[list[str]]:
    with RemoteServer(tiny_llama, ARGS) as srv:
        return _complete(srv.get_client())


def test_metrics_and_log_line(tiny_llama, expected):
    with RemoteServer(tiny_llama, ARGS + ["--speculative-config", json.dumps(SPEC)]) as srv:
        assert _complete(srv.get_client()) == expected
        srv.wait_idle()
        deadline = time.monotonic() + 30
        while True:  # the last step's stats reach the front-end's loggers after its output
            samples = _samples(srv)
            drafts = _spec(samples, "num_drafts_total")
            log = srv.log()
            lines = [line for line in log.splitlines() if "mean acceptance length" in line]
            if (drafts and lines) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        draft_tokens = _spec(samples, "num_draft_tokens_total")
        accepted = _spec(samples, "num_accepted_tokens_total")
        per_pos = [_spec(samples, "num_accepted_tokens_per_pos_total", position=str(j))
                   for j in range(4)]
        assert 0 < drafts <= draft_tokens <= 4 * drafts
        assert 0 < accepted <= draft_tokens
        assert sum(per_pos) == accepted
        assert per_pos == sorted(per_pos, reverse=True)  # a later draft needs the earlier
        assert lines, log[-2000:]
        assert "draft acceptance rate" in lines[-1]
