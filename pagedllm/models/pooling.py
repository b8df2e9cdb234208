"""Pooling of hidden states into embeddings, configured like sentence-transformers.

The hidden states of a batch are flat: sequences laid end to end, `[T, H]` with
`sum(seq_lens) == T`. The pooler returns one tensor per sequence (float32): `[H']` for
MEAN/CLS/LAST/MAX, `[len, H']` for ALL, where `H'` is `PoolingParams.dimensions` or `H`.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pagedllm.pooling_params import PoolingParams

# Model types whose embedding models pool the first ([CLS]) token by default (as vLLM does).
_ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")

# sentence-transformers Pooling config key -> our pooling type.
_ST_POOLING_KEYS = (
    ("pooling_mode_cls_token", "CLS"),
    ("pooling_mode_mean_tokens", "MEAN"),
    ("pooling_mode_max_tokens", "MAX"),
    ("pooling_mode_lasttoken", "LAST"),
)
_ST_UNSUPPORTED_KEYS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


class PoolingType(enum.Enum):
    """How the token states of one sequence become its embedding."""

    MEAN = "mean"  # average of all token states
    CLS = "cls"  # the first token's state
    LAST = "last"  # the last token's state
    MAX = "max"  # element-wise maximum over tokens
    ALL = "all"  # every token's state (per-token embeddings)

    @classmethod
    def parse(cls, value: PoolingType | str) -> PoolingType:
        """Accept a PoolingType or its name/value in any case ("mean", "CLS", ...)."""
        if isinstance(value, PoolingType):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            names = ", ".join(t.name for t in cls)
            raise ValueError(f"Unknown pooling type {value!r}; use one of {names}.") from None


def default_pooling_type(hf_config: Any) -> PoolingType:
    """CLS for BERT-like encoders, LAST for decoders (vLLM's defaults)."""
    model_type = getattr(hf_config, "model_type", None)
    return PoolingType.CLS if model_type in _ENCODER_MODEL_TYPES else PoolingType.LAST


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Pooler:
    """Pools flat hidden states per sequence, then truncates and normalizes per request.

    `normalize` is the model's default, used when a request's `PoolingParams.normalize` is
    None. `max_seq_length` (from sentence_bert_config.json) is the longest input the embedding
    model was trained for: the engine should use it as the model's maximum length.
    `do_lower_case`: sentence-transformers lower-cases the text before tokenizing.
    """

    def __init__(
        self,
        pooling_type: PoolingType | str = PoolingType.MEAN,
        normalize: bool = True,
        max_seq_length: int | None = None,
        do_lower_case: bool = False,
    ) -> None:
        self.pooling_type = PoolingType.parse(pooling_type)
        self.normalize = bool(normalize)
        self.max_seq_length = max_seq_length
        self.do_lower_case = do_lower_case

    def __repr__(self) -> str:
        return (
            f"Pooler(pooling_type={self.pooling_type.name}, normalize={self.normalize}, "
            f"max_seq_length={self.max_seq_length})"
        )

    @classmethod
    def from_model_folder(
        cls,
        folder: str | None,
        hf_config: Any = None,
        default_type: PoolingType | str | None = None,
    ) -> Pooler:
        """Build the pooler a model folder asks for.

        With sentence-transformers files (modules.json + the Pooling module's config.json),
        use their pooling mode, normalize iff a Normalize module is listed, and read
        max_seq_length from sentence_bert_config.json. Without them, use `default_type`
        (or CLS for BERT-like encoders, LAST for decoders) with normalize=True.
        """
        fallback = (
            PoolingType.parse(default_type)
            if default_type is not None
            else default_pooling_type(hf_config)
        )
        if folder is None or not os.path.isdir(folder):
            return cls(fallback, normalize=True)

        max_seq_length, do_lower_case = None, False
        st_config_path = os.path.join(folder, "sentence_bert_config.json")
        if os.path.isfile(st_config_path):
            st_config = _read_json(st_config_path)
            if st_config.get("max_seq_length") is not None:
                max_seq_length = int(st_config["max_seq_length"])
            do_lower_case = bool(st_config.get("do_lower_case", False))

        modules_path = os.path.join(folder, "modules.json")
        if not os.path.isfile(modules_path):
            return cls(fallback, True, max_seq_length, do_lower_case)

        modules = _read_json(modules_path)
        types = [m.get("type", "") for m in modules]
        unsupported = [t for t in types if t not in (_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE)]
        if unsupported:
            raise ValueError(
                f"{modules_path} lists sentence-transformers modules that pagedllm does not "
                f"support: {', '.join(unsupported)}."
            )
        normalize = _ST_NORMALIZE in types
        pooling_type = fallback
        pooling_modules = [m for m in modules if m.get("type") == _ST_POOLING]
        if pooling_modules:
            pooling_dir = os.path.join(folder, pooling_modules[0].get("path", ""))
            pooling_config_path = os.path.join(pooling_dir, "config.json")
            if os.path.isfile(pooling_config_path):
                pooling_type = cls._type_from_st_config(
                    _read_json(pooling_config_path), pooling_config_path
                )
        return cls(pooling_type, normalize, max_seq_length, do_lower_case)

    @staticmethod
    def _type_from_st_config(config: dict[str, Any], path: str) -> PoolingType:
        """The pooling type of a sentence-transformers Pooling config.json."""
        if isinstance(config.get("pooling_mode"), str) and not any(
            k in config for k, _ in _ST_POOLING_KEYS
        ):
            mode = config["pooling_mode"].lower()
            aliases = {"mean": "MEAN", "cls": "CLS", "max": "MAX", "lasttoken": "LAST"}
            if mode not in aliases:
                raise ValueError(f"{path}: pooling_mode {mode!r} is not supported.")
            return PoolingType[aliases[mode]]
        bad = [k for k in _ST_UNSUPPORTED_KEYS if config.get(k)]
        if bad:
            raise ValueError(f"{path}: {', '.join(bad)} is not supported.")
        chosen = [name for key, name in _ST_POOLING_KEYS if config.get(key)]
        if len(chosen) != 1:
            raise ValueError(
                f"{path}: expected exactly one pooling mode, found {chosen or 'none'} "
                "(combined modes are not supported)."
            )
        return PoolingType[chosen[0]]

    def pool(self, hidden_states: torch.Tensor, seq_lens: Sequence[int]) -> torch.Tensor:
        """Pool `[T, H]` into `[B, H]` float32 (not for ALL)."""
        if self.pooling_type is PoolingType.ALL:
            raise ValueError("PoolingType.ALL has one vector per token; use __call__.")
        device = hidden_states.device
        lens = torch.tensor(list(seq_lens), dtype=torch.long, device=device)
        if int(hidden_states.shape[0]) != sum(seq_lens):
            raise ValueError(
                f"hidden_states has {hidden_states.shape[0]} rows but seq_lens sum to "
                f"{sum(seq_lens)}."
            )
        if any(n < 1 for n in seq_lens):
            raise ValueError("every sequence needs at least one token.")
        ends = torch.cumsum(lens, 0)
        if self.pooling_type is PoolingType.CLS:
            return hidden_states[ends - lens].float()
        if self.pooling_type is PoolingType.LAST:
            return hidden_states[ends - 1].float()
        if self.pooling_type is PoolingType.MEAN:
            seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)
            sums = torch.zeros(
                len(seq_lens), hidden_states.shape[1], dtype=torch.float32, device=device
            )
            sums.index_add_(0, seq_ids, hidden_states.float())
            return sums / lens.unsqueeze(1).float()
        # MAX
        chunks = torch.split(hidden_states, list(seq_lens))
        return torch.stack([c.max(dim=0).values for c in chunks]).float()

    def _finish(self, x: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        """Truncate to params.dimensions, then L2-normalize if asked (last dim)."""
        if params.dimensions is not None:
            params.verify(x.shape[-1])
            x = x[..., : params.dimensions]
        normalize = self.normalize if params.normalize is None else params.normalize
        if normalize:
            x = F.normalize(x, p=2.0, dim=-1)
        return x

    def __call__(
        self,
        hidden_states: torch.Tensor,
        seq_lens: Sequence[int],
        pooling_params: Sequence[PoolingParams] | None = None,
    ) -> list[torch.Tensor]:
        """One float32 tensor per sequence: pooled, truncated, normalized per its params."""
        if pooling_params is None:
            pooling_params = [PoolingParams()] * len(seq_lens)
        if len(pooling_params) != len(seq_lens):
            raise ValueError(
                f"got {len(pooling_params)} PoolingParams for {len(seq_lens)} sequences."
            )
        per_token = self.pooling_type is PoolingType.ALL
        chunks: tuple[torch.Tensor, ...] = ()
        if per_token or any(p.task == "token_embed" for p in pooling_params):
            chunks = torch.split(hidden_states.float(), list(seq_lens))
        if per_token:
            return [self._finish(c, p) for c, p in zip(chunks, pooling_params, strict=True)]
        pooled = self.pool(hidden_states, seq_lens)
        first = pooling_params[0]
        uniform = all(
            p.dimensions == first.dimensions
            and p.normalize == first.normalize
            and p.task != "token_embed"
            for p in pooling_params
        )
        if uniform:
            return list(self._finish(pooled, first).unbind(0))
        return [
            self._finish(chunks[i] if p.task == "token_embed" else pooled[i], p)
            for i, p in enumerate(pooling_params)
        ]
