"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa) for embedding models.

The batch is flat: sequences laid end to end, `input_ids[T]`, `positions[T]` (0-based within
each sequence) and `seq_lens` with `sum(seq_lens) == T`. Linear layers run on the `T` real
tokens only; attention pads internally to `[B, L]` and runs bidirectional
`scaled_dot_product_attention` with a key padding mask. Weights use Hugging Face names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.models.pooling import Pooler, PoolingType
from pagedllm.pooling_params import PoolingParams

logger = logging.getLogger(__name__)

BERT_ARCHITECTURES = ("BertModel", "BertForMaskedLM")
ROBERTA_ARCHITECTURES = (
    "RobertaModel",
    "RobertaForMaskedLM",
    "XLMRobertaModel",
    "XLMRobertaForMaskedLM",
)
SUPPORTED_ARCHITECTURES = BERT_ARCHITECTURES + ROBERTA_ARCHITECTURES

_ROBERTA_MODEL_TYPES = ("roberta", "xlm-roberta")
_WEIGHT_PREFIXES = ("bert.", "roberta.", "model.")
# Checkpoint entries that this encoder does not use (heads and saved buffers).
_SKIPPED_PREFIXES = ("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.")
_SKIPPED_NAMES = ("embeddings.position_ids", "embeddings.token_type_ids")


def _activation(name: str) -> Any:
    """The FFN activation named by hidden_act ("gelu" is the exact erf GELU)."""
    name = name.lower()
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"hidden_act {name!r} is not supported by the BERT encoder.")


def position_offset(hf_config: Any) -> int:
    """How far position ids are shifted: RoBERTa counts from padding_idx + 1, BERT from 0."""
    if getattr(hf_config, "model_type", None) in _ROBERTA_MODEL_TYPES:
        return int(getattr(hf_config, "pad_token_id", 1)) + 1
    return 0


def _group_by_length(sorted_lens: Sequence[int], call_cost: int, window: int = 32) -> list[int]:
    """Split ascending lengths into contiguous groups; return the group end indices.

    Minimizes sum(n_g * L_g * (L_g + 64)) + call_cost * groups: attention work on the padded
    [n_g, L_g] block (quadratic scores, linear copies) plus a fixed cost per attention call.
    Cuts only fall between distinct lengths, and a group spans at most `window` of them.
    """
    ends: list[int] = []  # index one past the last sequence of each distinct length
    for i in range(1, len(sorted_lens) + 1):
        if i == len(sorted_lens) or sorted_lens[i] != sorted_lens[i - 1]:
            ends.append(i)
    u = len(ends)
    best = [0] * (u + 1)
    cut = [0] * (u + 1)
    for j in range(1, u + 1):
        longest = sorted_lens[ends[j - 1] - 1]
        per_seq = longest * (longest + 64)
        best[j], cut[j] = min(
            (best[i] + (ends[j - 1] - (ends[i - 1] if i else 0)) * per_seq + call_cost, i)
            for i in range(max(0, j - window), j)
        )
    group_ends = []
    j = u
    while j > 0:
        group_ends.append(ends[j - 1])
        j = cut[j]
    return group_ends[::-1]


class _AttentionMetadata:
    """How a flat batch maps onto padded `[n, L]` blocks for attention.

    Sequences are sorted by length and split into a few groups so that padding stays small;
    each group is one `scaled_dot_product_attention` call. `gather` takes the flat `[T]`
    tokens to the concatenated padded blocks (pad slots repeat a real token of the same
    sequence, masked out as keys; their query outputs are dropped), `scatter` takes the
    concatenated outputs back to flat order. Both are None when no reordering is needed.
    """

    def __init__(self, seq_lens: Sequence[int], device: torch.device) -> None:
        self.groups: list[tuple[int, int, torch.Tensor | None]] = []
        self.gather: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None
        longest = max(seq_lens)
        if all(n == longest for n in seq_lens):
            self.groups.append((len(seq_lens), longest, None))
            return
        call_cost = 65536 if device.type == "cpu" else 131072
        order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__)
        sorted_lens = [seq_lens[i] for i in order]
        starts = [0] * len(seq_lens)
        acc = 0
        for i, n in enumerate(seq_lens):
            starts[i] = acc
            acc += n
        row_base = [0] * len(seq_lens)  # first padded row of each sequence
        gathers = []
        row = 0
        prev = 0
        for end in _group_by_length(sorted_lens, call_cost):
            members = order[prev:end]
            n, length = end - prev, sorted_lens[end - 1]
            lens = torch.tensor([seq_lens[i] for i in members], device=device)
            first = torch.tensor([starts[i] for i in members], device=device)
            offs = torch.arange(length, device=device)
            valid = offs.unsqueeze(0) < lens.unsqueeze(1)  # [n, L]
            gathers.append((first.unsqueeze(1) + offs * valid).reshape(-1))
            uniform = sorted_lens[prev] == length
            self.groups.append((n, length, None if uniform else valid[:, None, None, :]))
            for k, i in enumerate(members):
                row_base[i] = row + k * length
            row += n * length
            prev = end
        self.gather = torch.cat(gathers)
        all_lens = torch.tensor(list(seq_lens), device=device)
        flat_starts = torch.tensor(starts, device=device)
        offset_in_seq = torch.arange(acc, device=device) - torch.repeat_interleave(
            flat_starts, all_lens
        )
        self.scatter = (
            torch.repeat_interleave(torch.tensor(row_base, device=device), all_lens)
            + offset_in_seq
        )


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, dtype=dtype)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h, dtype=dtype)
        self.token_type_embeddings = nn.Embedding(
            max(int(getattr(config, "type_vocab_size", 1) or 1), 1), h, dtype=dtype
        )
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps, dtype=dtype)
        self.position_offset = position_offset(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        token_type_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings(positions + self.position_offset)
        if token_type_ids is None:
            # Type 0 for every token: add row 0 once instead of gathering T rows.
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttentionOutput(nn.Module):
    """Output projection + residual + post-LayerNorm (HF `attention.output`)."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class BertAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused QKV projection."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        if h % self.num_heads:
            raise ValueError(
                f"hidden_size {h} is not divisible by num_attention_heads {self.num_heads}."
            )
        self.head_dim = h // self.num_heads
        self.qkv_proj = nn.Linear(h, 3 * h, dtype=dtype)
        self.output = BertSelfAttentionOutput(config, dtype)

    def forward(self, x: torch.Tensor, meta: _AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, 3H]
        if meta.gather is not None:
            qkv = qkv[meta.gather]  # padded blocks, laid end to end
        outs = []
        row = 0
        h = self.num_heads * self.head_dim
        for n, length, mask in meta.groups:
            block = qkv[row : row + n * length].view(n, length, 3, self.num_heads, self.head_dim)
            q, k, v = block.permute(2, 0, 3, 1, 4)  # each [n, heads, L, head_dim]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outs.append(attn.transpose(1, 2).reshape(n * length, h))
            row += n * length
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if meta.scatter is not None:
            out = out[meta.scatter]
        out = self.output.dense(out)
        return self.output.LayerNorm(out + x)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype)


class BertOutput(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class BertLayer(nn.Module):
    """Attention then FFN, each followed by residual + LayerNorm (post-LN)."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.attention = BertAttention(config, dtype)
        self.intermediate = BertIntermediate(config, dtype)
        self.output = BertOutput(config, dtype)
        self.act = _activation(getattr(config, "hidden_act", "gelu"))

    def forward(self, x: torch.Tensor, meta: _AttentionMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        y = self.output.dense(self.act(self.intermediate.dense(x)))
        return self.output.LayerNorm(y + x)


class BertEncoder(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, dtype) for _ in range(config.num_hidden_layers)
        )


class BertModel(nn.Module):
    """A BERT/RoBERTa encoder over a flat batch; returns the last hidden states `[T, H]`."""

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        pet = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
        if pet != "absolute":
            raise ValueError(
                f"position_embedding_type={pet!r} is not supported; only 'absolute' is."
            )
        self.config = hf_config
        self.dtype = dtype
        self.embeddings = BertEmbeddings(hf_config, dtype)
        self.encoder = BertEncoder(hf_config, dtype)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def max_positions(self) -> int:
        """The longest sequence the position table allows (after the RoBERTa offset)."""
        return int(self.config.max_position_embeddings) - self.embeddings.position_offset

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode the flat batch: ids/positions/types `[T]`, `sum(seq_lens) == T`."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError("input_ids and positions must be 1-D tensors of the same length.")
        if sum(seq_lens) != input_ids.shape[0] or any(n < 1 for n in seq_lens):
            raise ValueError(
                f"seq_lens {list(seq_lens)} must be positive and sum to {input_ids.shape[0]}."
            )
        meta = _AttentionMetadata(seq_lens, input_ids.device)
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x

    @staticmethod
    def _normalize_name(name: str) -> str:
        for prefix in _WEIGHT_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.endswith(".gamma"):
            name = name[: -len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[: -len(".beta")] + ".bias"
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named weights in; return the parameter names loaded.

        query/key/value go into the fused qkv_proj. Pooler/MLM heads and saved buffers are
        skipped. Raises ValueError if a parameter is missing or a shape does not match.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        qkv_shards: dict[str, set[str]] = {}
        unexpected: list[str] = []
        h = self.hidden_size
        for raw_name, tensor in weights:
            name = self._normalize_name(raw_name)
            if name.startswith(_SKIPPED_PREFIXES) or name in _SKIPPED_NAMES:
                continue
            shard = None
            for i, part in enumerate(("query", "key", "value")):
                marker = f".attention.self.{part}."
                if marker in name:
                    name = name.replace(marker, ".attention.qkv_proj.")
                    shard = (i, part)
                    break
            param = params.get(name)
            if param is None:
                unexpected.append(raw_name)
                continue
            with torch.no_grad():
                if shard is None:
                    target = param
                else:
                    target = param.narrow(0, shard[0] * h, h)
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"weight {raw_name!r} has shape {tuple(tensor.shape)}, the model "
                        f"expects {tuple(target.shape)}."
                    )
                target.copy_(tensor)
            if shard is None:
                loaded.add(name)
            else:
                qkv_shards.setdefault(name, set()).add(shard[1])
        loaded.update(n for n, parts in qkv_shards.items() if len(parts) == 3)
        if unexpected:
            logger.warning("Ignored %d unexpected weights, e.g. %s", len(unexpected),
                           unexpected[:5])
        missing = sorted(set(params) - loaded)
        if missing:
            partial = [n for n in missing if n in qkv_shards]
            detail = f" ({len(partial)} with only some of query/key/value)" if partial else ""
            raise ValueError(
                f"{len(missing)} weights missing from the checkpoint{detail}: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        return loaded


class BertEmbeddingModel(nn.Module):
    """A BERT-family encoder plus its pooler: the registry-facing embedding model.

    `pooler` defaults to CLS pooling with normalization (vLLM's default for BERT); build it
    with `Pooler.from_model_folder(folder, hf_config)` to follow sentence-transformers files.
    """

    is_pooling_model = True

    def __init__(
        self,
        hf_config: Any,
        dtype: torch.dtype = torch.float32,
        pooler: Pooler | None = None,
    ) -> None:
        super().__init__()
        self.model = BertModel(hf_config, dtype)
        self.pooler = pooler if pooler is not None else Pooler(PoolingType.CLS, normalize=True)

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder's last hidden states `[T, H]`."""
        return self.model(input_ids, positions, seq_lens, token_type_ids)

    def pool(
        self,
        hidden_states: torch.Tensor,
        seq_lens: list[int],
        pooling_params: Sequence[PoolingParams] | None = None,
    ) -> list[torch.Tensor]:
        """One embedding per sequence (see Pooler.__call__)."""
        return self.pooler(hidden_states, seq_lens, pooling_params)

    def embed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        pooling_params: Sequence[PoolingParams] | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Encode and pool in one call."""
        hidden = self.forward(input_ids, positions, seq_lens, token_type_ids)
        return self.pool(hidden, seq_lens, pooling_params)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named weights into the encoder; names are returned with `model.`."""
        return {f"model.{n}" for n in self.model.load_weights(weights)}
