"""Engine configuration: frozen dataclasses built and validated once by `EngineArgs`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.quantization.kv_cache import KV_CACHE_DTYPES, resolve_kv_cache_dtype
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.structured_output.config import StructuredOutputsConfig
from pagedllm.utils import parse_bytes

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "gguf")
RUNNERS = ("auto", "generate", "pooling")
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs", "processed_logits", "raw_logits")
QUANTIZATIONS = ("gguf", "fp8", "compressed-tensors", "awq", "gptq")
DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20  # cap of the CPU KV cache sized to the model


def resolve_dtype(dtype: str | torch.dtype, config_dtype: torch.dtype | None,
                  device: str) -> torch.dtype:
    """Turn a user dtype ("auto", "bfloat16", torch.float16, ...) into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16.")
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a string or torch.dtype, got {type(dtype).__name__}.")
    key = dtype.lower().removeprefix("torch.")
    if key == "auto":
        if device == "cpu":
            return torch.float32
        # GPUs run in bf16 unless the checkpoint asks for fp16.
        return torch.float16 if config_dtype == torch.float16 else torch.bfloat16
    if key not in _DTYPES:
        raise ValueError(
            f"Unknown dtype {dtype!r}. Use one of: auto, float32, float16, bfloat16."
        )
    return _DTYPES[key]


@dataclass(frozen=True)
class ModelConfig:
    """What model is served and how its weights and tokenizer are found."""

    model: str
    model_path: str  # local folder or .gguf file the loader reads
    tokenizer: str
    hf_config: Any  # transformers.PretrainedConfig
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    revision: str | None = None
    tokenizer_revision: str | None = None
    trust_remote_code: bool = False
    load_format: str = "auto"
    seed: int = 0
    served_model_name: str = ""
    runner: str = "generate"
    max_logprobs: int = 20
    logprobs_mode: str = "processed_logprobs"
    chat_template: str | None = None
    sliding_window: int | None = None
    skip_tokenizer_init: bool = False
    quantization: str | None = None  # "gguf": GGUF weights stay packed (CPU kernels)
    # fp8 / compressed-tensors / awq / gptq: how the linear layers are quantized
    quant: Any = None  # pagedllm.quantization.spec.QuantSpec

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.hf_config, "head_dim", None)
        return head_dim or self.hf_config.hidden_size // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and how much memory the blocks may take."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) or "fp8" (e4m3, per-tensor scales)


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of continuous batching."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    async_scheduling: bool = False  # overlap a step's host work with the previous GPU step


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: ranks and how their workers run ('mp' or 'ray'; None: one process)."""

    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"
    attention_backend: str | None = None
    enforce_eager: bool = False
    # Decode CUDA graphs are captured for batches up to this many requests (and
    # max_num_seqs); larger decode batches run eagerly.
    max_cudagraph_capture_size: int = 512
    cpu_threads: int | None = None  # torch intra-op threads on the CPU (None: leave torch's)
    # cpu_threads was left to the engine: it runs 1 or cpu_threads threads, whichever its
    # measured forwards find faster (worker/cpu_threads.ThreadTuner)
    cpu_threads_adaptive: bool = False

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig
    disable_log_stats: bool = False
    structured_outputs: StructuredOutputsConfig = field(
        default_factory=lambda: StructuredOutputsConfig.parse(None))
    speculative: SpeculativeConfig | None = None
    draft_model: ModelConfig | None = None  # the draft of speculative method "draft_model"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


USAGES = ("offline", "server")
LARGE_GPU_BYTES = 70 << 30  # vLLM's bound for its larger batch defaults (H100, H200, ...)


def batch_defaults(device: str, usage: str) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) for unset values, as vLLM picks them: on a
    GPU of at least 70 GiB other than an A100, 1,024 sequences and 16,384 tokens offline
    (8,192 for a server, whose step time is every stream's inter-token latency); on other
    GPUs 256 and 8,192; on the CPU 128 and 2,048."""
    if device == "cpu":
        return 128, 2048
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if props.total_memory >= LARGE_GPU_BYTES and "a100" not in props.name.lower():
        return 1024, (16384 if usage == "offline" else 8192)
    return 256, 8192


def default_capture_size(max_num_seqs: int) -> int:
    """max_cudagraph_capture_size when unset: 512, or up to 1,024 for larger max_num_seqs
    (eager decode steps of a MoE model are launch-bound)."""
    return max(512, min(max_num_seqs, 1024))


@dataclass
class EngineArgs:
    """All user-facing engine knobs, named as in vLLM. `create_engine_config` validates them."""

    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    trust_remote_code: bool = False
    download_dir: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    load_format: str = "auto"
    device: str = "auto"
    block_size: int | None = None  # the attention backend's default (16; FLASH_ATTN: 256)
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | str | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    max_cudagraph_capture_size: int | None = None
    async_scheduling: bool | None = None
    attention_backend: str | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    served_model_name: str | None = None
    runner: str = "auto"
    max_logprobs: int = 20
    logprobs_mode: str = "processed_logprobs"
    disable_log_stats: bool = False
    chat_template: str | None = None
    skip_tokenizer_init: bool = False
    structured_outputs_config: StructuredOutputsConfig | dict[str, Any] | str | None = None
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    cpu_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- CLI
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the engine flags (vLLM spelling) to an argparse parser."""
        g = parser.add_argument_group("engine")
        g.add_argument("--tokenizer", help="Tokenizer folder or hub id (default: the model's).")
        g.add_argument("--revision", help="Model revision (branch, tag or commit) on the hub.")
        g.add_argument("--tokenizer-revision", help="Tokenizer revision on the hub.")
        g.add_argument("--trust-remote-code", action="store_true",
                       help="Allow custom code from the model repository (tokenizer/config).")
        g.add_argument("--download-dir", help="Where hub downloads go (default: the HF cache).")
        g.add_argument("--dtype", default="auto",
                       help="auto, float32, float16 or bfloat16 (auto: fp32 on CPU, bf16 on GPU; "
                            "a GGUF model on the CPU stays packed with bf16 activations where "
                            "the CPU has AVX512-BF16 / AMX). An explicit dtype dequantizes a "
                            "GGUF model to it.")
        g.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default=None,
                       help="gguf: keep a GGUF checkpoint's quantized weights packed for the "
                            "CPU kernels (the default for .gguf files on the CPU with dtype "
                            "auto). fp8: quantize a bf16 / fp16 checkpoint's linear layers to "
                            "FP8 at load (GPU with compute capability >= 8.9). "
                            "compressed-tensors / fp8 / awq / gptq checkpoints are detected "
                            "from config.json without this flag (on the CPU they are "
                            "dequantized at load).")
        g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                       help="auto: the model dtype; fp8 (= fp8_e4m3): e4m3 with per-tensor "
                            "scales from the checkpoint (else 1.0), twice the blocks "
                            "(TRITON_ATTN, compute capability >= 8.9).")
        g.add_argument("--cpu-threads", type=int, default=None,
                       help="Torch threads of the CPU engine (default: PAGEDLLM_CPU_THREADS, "
                            "else the cores this process may run on).")
        g.add_argument("--seed", type=int, default=0, help="Global random seed.")
        g.add_argument("--max-model-len", type=int,
                       help="Longest prompt + output in tokens (default: from the model config).")
        g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                       help="Weight format; 'dummy' makes random weights (benchmarks).")
        g.add_argument("--device", default="auto", help="auto, cpu or cuda.")
        g.add_argument("--block-size", type=int, default=None,
                       help="Tokens per KV cache block (default 16; 256 with FLASH_ATTN).")
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="Fraction of GPU memory the engine may use (weights + KV cache).")
        g.add_argument("--kv-cache-memory-bytes", default=None,
                       help="KV cache size in bytes (e.g. 4GiB); overrides the utilization rule.")
        g.add_argument("--num-gpu-blocks-override", type=int,
                       help="Fix the number of KV cache blocks (testing).")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True, help="Reuse KV blocks of shared prompt prefixes.")
        g.add_argument("--max-num-seqs", type=int,
                       help="Most requests in one step (default 1024 on a GPU of 70 GiB or "
                            "more other than an A100, else 256; 128 on the CPU).")
        g.add_argument("--max-num-batched-tokens", type=int,
                       help="Most tokens in one step (default 8192, and 16384 for the "
                            "offline LLM on a GPU of 70 GiB or more other than an A100; "
                            "2048 on the CPU).")
        g.add_argument("--enforce-eager", action="store_true", help="Disable CUDA graphs.")
        g.add_argument("--max-cudagraph-capture-size", type=int, default=None,
                       help="Capture decode CUDA graphs for batches up to this many requests "
                            "(default 512, or --max-num-seqs up to 1024 when that is larger; "
                            "never past --max-num-seqs); larger decode "
                            "batches run eagerly. More graphs take longer to capture and "
                            "hold more memory.")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="Schedule and prepare step N+1 while the GPU runs step N "
                            "(default: on for CUDA).")
        g.add_argument("--attention-backend",
                       help="TRITON_ATTN (default on CUDA), TORCH_SDPA (CPU and CUDA) or "
                            "FLASH_ATTN (CUDA, fp16/bf16).")
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="Number of GPUs (or CPU processes) to shard the model over.")
        g.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                       help="How tensor-parallel workers run: processes on this machine "
                            "(mp, the default) or Ray actors, possibly on several machines.")
        g.add_argument("--runner", default="auto", choices=RUNNERS,
                       help="generate (text generation) or pooling (embeddings); auto picks.")
        g.add_argument("--max-logprobs", type=int, default=20,
                       help="Largest number of logprobs a request may ask for.")
        g.add_argument("--logprobs-mode", default="processed_logprobs", choices=LOGPROBS_MODES,
                       help="What logprobs report: processed_* (default) are taken from the "
                            "distribution tokens are sampled from (after penalties, bias, "
                            "temperature, top-k/top-p/min-p), raw_* from the model's logits "
                            "before any of that (vLLM V1's default); *_logits return logits.")
        g.add_argument("--skip-tokenizer-init", action="store_true",
                       help="Do not load a tokenizer: prompts must be token ids, no text out.")
        g.add_argument("--disable-log-stats", action="store_true",
                       help="Do not log periodic throughput statistics.")
        g.add_argument("--structured-outputs-config",
                       help='Structured outputs as a JSON object, e.g. {"backend": "guidance"}: '
                            'backend auto (xgrammar when installed and it takes the request, '
                            'else llguidance), xgrammar or guidance; disable_any_whitespace, '
                            'compile_workers, grammar_cache_size.')
        g.add_argument("--speculative-config",
                       help='Speculative decoding as a JSON object: {"method": "ngram", '
                            '"num_speculative_tokens": 4, "prompt_lookup_max": 4} (prompt '
                            'lookup) or {"model": "DRAFT", "num_speculative_tokens": 4} (a '
                            'draft model sharing the vocabulary).')
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})

    # ------------------------------------------------------------- config
    def create_engine_config(self, usage: str = "offline") -> EngineConfig:
        """Validate every knob once and resolve the model; raises ValueError with a fix.
        `usage` ("offline" for `LLM`, "server") picks the batch defaults
        (`batch_defaults`)."""
        if usage not in USAGES:
            raise ValueError(f"usage must be one of {', '.join(USAGES)} (got {usage!r}).")
        from pagedllm.attention.selector import check_attention_config
        from pagedllm.distributed.checks import resolve_tensor_parallel
        from pagedllm.models.loader.resolve import resolve_model
        from pagedllm.models.registry import resolve_architecture
        from pagedllm.spec_decode.draft_config import resolve_draft_model

        self._validate_scalars()
        device = self._resolve_device()
        resolved = resolve_model(
            self.model,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            download_dir=self.download_dir,
            load_format=self.load_format,
        )
        hf_config = resolved.hf_config
        runner, architecture = resolve_architecture(hf_config, self.runner)
        config_dtype = _config_dtype(hf_config)
        quantization = self._resolve_quantization(resolved.load_format, device)
        quant = None
        if quantization != "gguf" and resolved.load_format != "gguf":
            from pagedllm.quantization.spec import resolve_quantization

            quant = resolve_quantization(quantization, hf_config, device,
                                         self.tensor_parallel_size)
            quantization = quant.method if quant is not None else None
        if quantization == "gguf" and str(self.dtype).lower() == "auto":
            dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
        else:
            dtype = resolve_dtype(self.dtype, config_dtype, device)
        if device == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is not supported on CPU; use dtype='float32' or 'bfloat16'.")

        derived_len = _derived_max_model_len(hf_config)
        max_model_len = self.max_model_len or derived_len
        if self.max_model_len is not None and self.max_model_len > derived_len:
            raise ValueError(
                f"max_model_len={self.max_model_len} is larger than the model's maximum "
                f"context ({derived_len}, from max_position_embeddings); pass a value "
                f"<= {derived_len}."
            )
        sliding_window = getattr(hf_config, "sliding_window", None)
        if not getattr(hf_config, "use_sliding_window", True):
            sliding_window = None

        model = ModelConfig(
            model=self.model or resolved.path,
            model_path=resolved.path,
            tokenizer=self.tokenizer or resolved.tokenizer_path,
            hf_config=hf_config,
            architecture=architecture,
            dtype=dtype,
            max_model_len=max_model_len,
            revision=self.revision,
            tokenizer_revision=self.tokenizer_revision,
            trust_remote_code=self.trust_remote_code,
            load_format=resolved.load_format,
            seed=self.seed,
            served_model_name=self.served_model_name or self.model or _default_model_name(),
            runner=runner,
            max_logprobs=self.max_logprobs,
            logprobs_mode=self.logprobs_mode,
            chat_template=self.chat_template,
            sliding_window=sliding_window if isinstance(sliding_window, int) else None,
            skip_tokenizer_init=self.skip_tokenizer_init,
            quantization=quantization,
            quant=quant,
        )
        kv_bytes = self.kv_cache_memory_bytes
        if isinstance(kv_bytes, str):
            kv_bytes = parse_bytes(kv_bytes)
        attention_backend = self.attention_backend or os.environ.get("PAGEDLLM_ATTENTION_BACKEND")
        attention_backend = attention_backend.upper() if attention_backend else None
        kv_cache_dtype = resolve_kv_cache_dtype(self.kv_cache_dtype)
        speculative = (SpeculativeConfig.parse(self.speculative_config)
                       if self.speculative_config is not None else None)
        if (speculative is not None and speculative.method == "draft_model"
                and kv_cache_dtype != "auto"):
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} with a speculative draft model is not "
                "supported (the draft's cache keeps its weights' dtype); use "
                "kv_cache_dtype='auto' or the 'ngram' method.")
        block_size = check_attention_config(attention_backend, device, self.block_size, dtype,
                                            model.head_dim, kv_cache_dtype)
        cache = CacheConfig(
            block_size=block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_bytes,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_dtype=kv_cache_dtype,
        )
        default_seqs, default_tokens = batch_defaults(device, usage)
        max_num_seqs = self.max_num_seqs or default_seqs
        max_batched = self.max_num_batched_tokens or max(default_tokens, max_num_seqs)
        if max_batched < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) must be >= max_num_seqs "
                f"({max_num_seqs}) so every running request can decode each step."
            )
        if speculative is not None and self.async_scheduling:
            raise ValueError("async_scheduling=True does not work with speculative_config: "
                             "each verify step's accepted tokens decide the next step's "
                             "inputs. Leave async_scheduling unset (off with speculation).")
        scheduler = SchedulerConfig(
            max_num_batched_tokens=max_batched,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            async_scheduling=(device == "cuda" and speculative is None
                              if self.async_scheduling is None else self.async_scheduling),
        )
        parallel = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            distributed_executor_backend=resolve_tensor_parallel(
                model, self.tensor_parallel_size, self.distributed_executor_backend, device),
        )
        capture = self.max_cudagraph_capture_size
        if capture is not None and (isinstance(capture, bool) or not isinstance(capture, int)
                                    or capture < 1):
            raise ValueError(f"max_cudagraph_capture_size must be an integer >= 1 (got "
                             f"{capture!r}); use enforce_eager=True to capture no graphs.")
        device_config = DeviceConfig(
            device=device,
            attention_backend=attention_backend,
            enforce_eager=self.enforce_eager,
            max_cudagraph_capture_size=(capture if capture is not None
                                        else default_capture_size(max_num_seqs)),
            cpu_threads=self._resolve_cpu_threads(device),
            cpu_threads_adaptive=self._cpu_threads_adaptive(device),
        )
        return EngineConfig(
            model=model,
            cache=cache,
            scheduler=scheduler,
            parallel=parallel,
            device=device_config,
            disable_log_stats=self.disable_log_stats,
            structured_outputs=StructuredOutputsConfig.parse(self.structured_outputs_config),
            speculative=speculative,
            draft_model=(resolve_draft_model(speculative, model, device,
                                             self.tensor_parallel_size)
                         if speculative is not None else None),
        )

    def _resolve_quantization(self, load_format: str, device: str) -> str | None:
        """'gguf' (weights stay packed), None (dense, dequantized where quantized) or, for
        other files, the requested method (checked against the checkpoint later)."""
        q = self.quantization.lower() if isinstance(self.quantization, str) else None
        if load_format != "gguf":
            if q == "gguf":
                raise ValueError("quantization='gguf' needs a .gguf model file.")
            return q
        if q not in (None, "gguf"):
            raise ValueError(f"quantization={q!r} does not apply to a .gguf file; leave it "
                             "unset or use 'gguf'.")
        if q is None:  # automatic: packed on one CPU process, unless a dtype is asked for
            if (device != "cpu" or self.tensor_parallel_size != 1
                    or str(self.dtype).lower() != "auto"):
                return None
            if not cpu_has_bf16():
                logging.getLogger(__name__).info(
                    "This CPU has no AVX512-BF16 / AMX: the GGUF weights are dequantized to "
                    "float32 (the packed kernels are slow with float32 activations).")
                return None
            return "gguf"
        if device != "cpu":
            raise ValueError("quantization='gguf' runs on the CPU only; on CUDA leave it "
                             "unset (the GGUF weights are dequantized).")
        if self.tensor_parallel_size != 1:
            raise ValueError("quantization='gguf' needs tensor_parallel_size=1; leave it unset "
                             "to shard the dequantized weights.")
        return q

    def _cpu_threads_adaptive(self, device: str) -> bool:
        """Whether the CPU engine tunes its thread count: nobody set it, one process, more
        than one core."""
        return (device == "cpu" and self.cpu_threads is None
                and not os.environ.get("PAGEDLLM_CPU_THREADS")
                and self.tensor_parallel_size == 1
                and (self._resolve_cpu_threads(device) or 1) > 1)

    def _resolve_cpu_threads(self, device: str) -> int | None:
        """Torch threads of the CPU engine: the flag, PAGEDLLM_CPU_THREADS, or the cores
        this process may run on (shared by the tensor-parallel ranks)."""
        if device != "cpu":
            return None
        threads = self.cpu_threads
        if threads is None and os.environ.get("PAGEDLLM_CPU_THREADS"):
            raw = os.environ["PAGEDLLM_CPU_THREADS"]
            try:
                threads = int(raw)
            except ValueError:
                raise ValueError(f"PAGEDLLM_CPU_THREADS={raw!r} must be an integer.") from None
        if threads is not None:
            _check_int("cpu_threads", threads, 1)
            return threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        return max(1, cores // self.tensor_parallel_size)

    def _validate_scalars(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError("model must be a non-empty string: a local folder, a .gguf file "
                             "or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'.")
        if self.block_size is not None:  # which sizes fit: the attention backend's check
            _check_int("block_size", self.block_size, 1)
        if not 0.0 < float(self.gpu_memory_utilization) <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]."
            )
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "num_gpu_blocks_override"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 1)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("max_logprobs", self.max_logprobs, 0)
        q = self.quantization
        if q is not None and (not isinstance(q, str) or q.lower() not in QUANTIZATIONS):
            raise ValueError(f"quantization={q!r} is not supported; supported: "
                             f"{', '.join(QUANTIZATIONS)} (or leave it unset).")
        resolve_kv_cache_dtype(self.kv_cache_dtype)
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"Unknown load_format {self.load_format!r}; use one of {', '.join(LOAD_FORMATS)}."
            )
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"Unknown logprobs_mode {self.logprobs_mode!r}; use one of "
                             f"{', '.join(LOGPROBS_MODES)}.")
        if self.runner not in RUNNERS:
            raise ValueError(f"Unknown runner {self.runner!r}; use one of {', '.join(RUNNERS)}.")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError(
                f"Unknown distributed_executor_backend {self.distributed_executor_backend!r}; "
                "use 'mp' or 'ray'."
            )
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")

    def _resolve_device(self) -> str:
        device = (self.device or "auto").lower()
        if device == "auto":
            return default_device()
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(
                    "device='cuda' was asked for but no CUDA device is available; "
                    "use device='cpu'."
                )
            return "cuda"
        if device != "cpu":
            raise ValueError(f"Unknown device {self.device!r}; use 'auto', 'cpu' or 'cuda'.")
        return device


def _default_model_name() -> str:
    from pagedllm.models.loader.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), per /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def _config_dtype(hf_config: Any) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        return _DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else None


def _derived_max_model_len(hf_config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
