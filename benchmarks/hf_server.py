"""A minimal OpenAI-compatible streaming server around HF transformers `generate`, as a
serving peer for `pagedllm bench serve` (benchmarks only).

Batching is static: a worker thread takes the requests waiting when it is free (up to
--max-batch-size; 1 = one request at a time), left-pads them into one batch and runs
`generate` to the longest max_tokens of the batch; each row streams its own tokens and stops
at its max_tokens (or EOS unless ignore_eos). Requests arriving meanwhile wait for the next
batch. Greedy when temperature is 0, else sampling with that temperature.

  python benchmarks/hf_server.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
      --port 8001 --max-batch-size 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    temperature: float
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # text deltas, then None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False


class _RowStreamer(BaseStreamer):
    """Receives one token per row per step from `generate` and feeds each job's queue."""

    def __init__(self, jobs: list[Job], tokenizer: Any, eos: int | None) -> None:
        self.jobs, self.tokenizer, self.eos = jobs, tokenizer, eos
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done:
                continue
            if token == self.eos and not job.ignore_eos:
                self._finish(job)
                continue
            job.token_ids.append(token)
            text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
            delta, job.text = text[len(job.text):], text
            job.loop.call_soon_threadsafe(job.out.put_nowait, delta)
            if len(job.token_ids) >= job.max_tokens:
                self._finish(job)

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                self._finish(job)

    @staticmethod
    def _finish(job: Job) -> None:
        job.done = True
        job.loop.call_soon_threadsafe(job.out.put_nowait, None)


class HFEngine:
    def __init__(self, model: str, max_batch_size: int, dtype: torch.dtype) -> None:
        folder, name = os.path.split(model) if model.endswith(".gguf") else (model, None)
        kwargs: dict[str, Any] = {"gguf_file": name} if name else {}
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else (self.eos or 0)
        self.max_batch_size = max_batch_size
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            self._run(batch)

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> None:
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(batch):  # left padding
            ids[i, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids):] = 1
        temperature = batch[0].temperature
        sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
            if temperature > 0 else dict(do_sample=False)
        streamer = _RowStreamer(batch, self.tokenizer, self.eos)
        try:
            self.model.generate(ids, attention_mask=mask, streamer=streamer,
                                max_new_tokens=max(j.max_tokens for j in batch),
                                eos_token_id=None, pad_token_id=self.pad, **sample)
        finally:
            streamer.end()


def build_app(engine: HFEngine, served_name: str) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_name, "object": "model"}]}

    async def handle(body: dict, chat: bool) -> Any:
        if chat:
            ids = engine.tokenizer.apply_chat_template(body["messages"],
                                                       add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            prompt = body["prompt"]
            ids = prompt if isinstance(prompt, list) else engine.tokenizer.encode(prompt)
        job = Job(list(ids), int(body.get("max_tokens") or 16), bool(body.get("ignore_eos")),
                  float(body.get("temperature", 1.0)), asyncio.get_running_loop(),
                  asyncio.Queue())
        engine.jobs.put(job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None) -> dict:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if text is not None else {}
            else:
                choice["text"] = text or ""
            return {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                    "model": served_name, "choices": [choice]}

        def finish_reason() -> str:
            return "length" if len(job.token_ids) >= job.max_tokens else "stop"

        def usage() -> dict:
            n = len(job.token_ids)
            return {"prompt_tokens": len(ids), "completion_tokens": n,
                    "total_tokens": len(ids) + n}

        if not body.get("stream"):
            while await job.out.get() is not None:
                pass
            out = chunk(job.text, finish_reason())
            if chat:
                out["choices"][0]["message"] = {"role": "assistant", "content": job.text}
                del out["choices"][0]["delta"]
            return JSONResponse({**out, "object": kind, "usage": usage()})

        async def events() -> AsyncIterator[str]:
            while (delta := await job.out.get()) is not None:
                yield f"data: {json.dumps(chunk(delta))}\n\n"
            yield f"data: {json.dumps(chunk(None, finish_reason()))}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({**chunk(None), 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle(await request.json(), chat=True)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="HF folder or .gguf file (default: pagedllm's default GGUF)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--max-batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.max_batch_size < 1:
        ap.error("--max-batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from pagedllm.models.loader.gguf_loader import find_default_model

        model = find_default_model()
    name = args.served_model_name or os.path.basename(model.rstrip("/"))
    engine = HFEngine(model, args.max_batch_size, getattr(torch, args.dtype))
    uvicorn.run(build_app(engine, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
