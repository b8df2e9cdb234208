"""PoolingEngine: runs embedding (pooling) models for `LLM.encode` / `LLM.embed`.

Encoder models (BERT family) run on flat batches without a KV cache. Decoder models used as
embedders (Qwen2, Llama, ...) run a prefill-only forward with the TORCH_SDPA backend over a
scratch paged KV cache that lives only for the batch. Prompts are packed into batches of at
most `max_batch_tokens` tokens; each batch is one forward pass, then the model folder's
pooler (sentence-transformers config, or CLS/LAST defaults) makes one output per prompt.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pagedllm.attention.backends.abstract import AttentionMetadata
from pagedllm.attention.selector import get_attention_backend
from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.engine.input_processor import PromptType, load_tokenizer, prompt_token_ids
from pagedllm.models.loader.model_loader import load_model
from pagedllm.models.pooling import Pooler
from pagedllm.models.registry import get_model_class
from pagedllm.outputs import PoolingOutput, PoolingRequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.utils import cdiv

logger = logging.getLogger(__name__)

# Upper bounds of one forward pass.
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_BATCH_SEQS = 256
_SCRATCH_BLOCK_SIZE = 16


def _checkpoint_has_lm_head(folder: str) -> bool:
    """True unless the folder's safetensors files are known to lack `lm_head.weight`."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        return True  # another format: let the loader decide
    for file in files:
        with safe_open(file, framework="pt") as f:
            if any(k.endswith("lm_head.weight") for k in f.keys()):  # noqa: SIM118
                return True
    return False


def _without_lm_head(mc: ModelConfig) -> ModelConfig:
    """The config to build a decoder embedder from a checkpoint without an LM head.

    Embedding checkpoints of decoders (e.g. saved from HF `Qwen2Model`) have no
    `lm_head.weight`; pooling never computes logits, so tie the head to the embeddings
    instead of failing on the missing weight.
    """
    if (
        getattr(mc.hf_config, "tie_word_embeddings", False)
        or mc.load_format not in ("auto", "safetensors")
        or not os.path.isdir(mc.model_path)
        or _checkpoint_has_lm_head(mc.model_path)
    ):
        return mc
    hf_config = copy.deepcopy(mc.hf_config)
    hf_config.tie_word_embeddings = True
    return dataclasses.replace(mc, hf_config=hf_config)


class PoolingEngine:
    """Embeds prompts with a pooling model: tokenize, validate, batch by tokens, pool."""

    def __init__(
        self,
        config: EngineConfig,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch_seqs: int = DEFAULT_MAX_BATCH_SEQS,
    ) -> None:
        self.config = config
        mc = config.model
        self.model_config = mc
        self.device = config.device.torch_device
        self.tokenizer: Any = None if mc.skip_tokenizer_init else load_tokenizer(mc)
        cls = get_model_class(mc.architecture)
        self.is_decoder = hasattr(cls, "compute_logits")
        self.backend: Any = None
        if self.is_decoder:
            # Prefill-only attention over a per-batch scratch cache; TORCH_SDPA runs anywhere.
            self.backend = get_attention_backend("TORCH_SDPA", self.device.type)
            self.model = load_model(_without_lm_head(mc), self.backend.get_impl_cls(),
                                    self.device)
        else:
            self.model = load_model(mc, None, self.device)
        self.hidden_size = int(mc.hf_config.hidden_size)
        folder = mc.model_path if os.path.isdir(mc.model_path) else None
        self.pooler = Pooler.from_model_folder(folder, mc.hf_config)
        limits = [mc.max_model_len]
        if not self.is_decoder and hasattr(self.model, "max_positions"):
            limits.append(int(self.model.max_positions))
        if self.pooler.max_seq_length is not None:
            limits.append(self.pooler.max_seq_length)
        self.max_model_len = min(limits)
        self.max_batch_tokens = max(max_batch_tokens, self.max_model_len)
        self.max_batch_seqs = max_batch_seqs
        self._counter = itertools.count()
        self._num_requests = 0
        self._num_prompt_tokens = 0
        logger.info("Pooling engine: %s, %r, max length %d", mc.architecture, self.pooler,
                    self.max_model_len)

    # ------------------------------------------------------------ inputs
    def _tokenize(self, prompt: PromptType, params: PoolingParams) -> tuple[str | None, list[int]]:
        """Validate one prompt and return (text or None, token ids) within the max length."""
        text, ids = prompt_token_ids(prompt, self.tokenizer, self.model_config.vocab_size,
                                     lower_case=self.pooler.do_lower_case)
        limit = self.max_model_len
        truncate = params.truncate_prompt_tokens
        if truncate is not None:
            if truncate == -1:
                truncate = limit
            if truncate > limit:
                raise ValueError(f"truncate_prompt_tokens={truncate} is larger than the model's "
                                 f"maximum length ({limit}).")
            ids = ids[-truncate:]
        if len(ids) > limit:
            raise ValueError(
                f"The input has {len(ids)} tokens, but the model's maximum length is {limit}. "
                "Shorten it, or pass PoolingParams(truncate_prompt_tokens=k) (or -1 for the "
                "maximum) to keep only the last k tokens."
            )
        return text, ids

    # ------------------------------------------------------------ forward
    def _forward(self, seqs: list[list[int]]) -> torch.Tensor:
        """The model's last hidden states `[T, H]` for a flat batch of sequences."""
        lens = [len(s) for s in seqs]
        dev = self.device
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=dev)
        positions_np = np.concatenate([np.arange(n) for n in lens])
        positions = torch.from_numpy(positions_np).to(dev)
        if not self.is_decoder:
            return self.model(ids, positions, lens)
        mc = self.model_config
        bs = _SCRATCH_BLOCK_SIZE
        blocks_per = [cdiv(n, bs) for n in lens]
        table = np.zeros((len(lens), max(blocks_per)), dtype=np.int32)
        first = 0
        for i, nb in enumerate(blocks_per):
            table[i, :nb] = np.arange(first, first + nb)
            first += nb
        req_idx = np.repeat(np.arange(len(lens)), lens)
        slots = table[req_idx, positions_np // bs].astype(np.int64) * bs + positions_np % bs
        num_kv_heads = self.model.layers[0].self_attn.num_kv_heads
        # One scratch tensor is shared by all layers: each layer writes its KV, then reads it.
        cache = torch.zeros(self.backend.kv_cache_shape(first, bs, num_kv_heads, mc.head_dim),
                            dtype=mc.dtype, device=dev)
        qsl = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        seq_t = torch.tensor(lens, dtype=torch.int32)
        md = AttentionMetadata(
            num_actual_tokens=len(ids),
            num_reqs=len(lens),
            max_query_len=max(lens),
            max_seq_len=max(lens),
            query_start_loc=qsl.to(dev),
            seq_lens=seq_t.to(dev),
            block_table=torch.from_numpy(table).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_t,
            is_decode_only=all(n == 1 for n in lens),
        )
        return self.model(ids, positions, [cache] * mc.num_layers, md)

    def _batches(self, lens: list[int]) -> list[list[int]]:
        """Indices of the prompts, packed in order into batches bounded by tokens and seqs."""
        batches: list[list[int]] = []
        cur: list[int] = []
        tokens = 0
        for i, n in enumerate(lens):
            if cur and (tokens + n > self.max_batch_tokens or len(cur) >= self.max_batch_seqs):
                batches.append(cur)
                cur, tokens = [], 0
            cur.append(i)
            tokens += n
        if cur:
            batches.append(cur)
        return batches

    # ------------------------------------------------------------ API
    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[PoolingRequestOutput]:
        """Pool each prompt; outputs come in input order (tensors on the CPU, float32)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if pooling_params is None:
            params_list = [PoolingParams() for _ in prompts]
        elif isinstance(pooling_params, PoolingParams):
            params_list = [pooling_params] * len(prompts)
        else:
            params_list = list(pooling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"Got {len(params_list)} PoolingParams for {len(prompts)} "
                                 "prompts; pass one, or one per prompt.")
        for p in params_list:
            if not isinstance(p, PoolingParams):
                raise ValueError(f"pooling_params must be PoolingParams, got "
                                 f"{type(p).__name__}.")
            p.verify(self.hidden_size)
        # Validate everything before running anything.
        inputs = [self._tokenize(pr, pa) for pr, pa in zip(prompts, params_list, strict=True)]
        seqs = [ids for _, ids in inputs]
        results: list[torch.Tensor | None] = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="Processed prompts", disable=not use_tqdm)
        with torch.inference_mode():
            for batch in self._batches([len(s) for s in seqs]):
                batch_seqs = [seqs[i] for i in batch]
                hidden = self._forward(batch_seqs)
                pooled = self.pooler(hidden, [len(s) for s in batch_seqs],
                                     [params_list[i] for i in batch])
                for i, v in zip(batch, pooled, strict=True):
                    results[i] = v.cpu()
                bar.update(len(batch))
        bar.close()
        self._num_requests += len(seqs)
        self._num_prompt_tokens += sum(len(s) for s in seqs)
        outputs = []
        for (text, ids), data in zip(inputs, results, strict=True):
            assert data is not None
            outputs.append(PoolingRequestOutput(
                request_id=str(next(self._counter)),
                outputs=PoolingOutput(data=data),
                prompt_token_ids=ids,
                finished=True,
                prompt=text,
            ))
        return outputs

    def get_stats(self) -> dict[str, Any]:
        """Counters of this engine (no KV cache or scheduler state for pooling)."""
        return {
            "num_running": 0,
            "num_waiting": 0,
            "num_requests": self._num_requests,
            "num_prompt_tokens": self._num_prompt_tokens,
        }

    def reset_prefix_cache(self) -> bool:
        """Pooling keeps no prefix cache; nothing to reset."""
        return True
