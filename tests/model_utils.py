"""Build tiny random Hugging Face models (with a real tokenizer) offline, for tests.

`make_tiny_model(dir)` writes a ~100 kB Llama-style checkpoint, a small BPE tokenizer and a
ChatML chat template into `dir` and returns the path, ready for `EngineArgs(model=path)`.
The tokenizer covers all printable ASCII, so every token decodes to valid text (no partial
UTF-8), and the weights are seeded so outputs are deterministic across runs.
"""

from __future__ import annotations

import os
import string
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "San Francisco is a city in California, famous for the Golden Gate Bridge.",
    "Hello, my name is Ada and I like to write programs.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Who won the world series in 2020? The Los Angeles Dodgers won it.",
    "You are a helpful assistant. Answer the question in one sentence.",
    "Once upon a time there was a little model that generated text.",
    "1 2 3 4 5 6 7 8 9 10, counting numbers is easy.",
)

# Tiny shapes used for every architecture (llama, qwen2, qwen3, mistral, ...);
# keyword overrides of make_tiny_model win.
TINY_SHAPES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def make_tiny_tokenizer(vocab_size: int = 400, chat_template: str | None = CHATML_TEMPLATE):
    """Train a small BPE tokenizer (sentencepiece-style spaces) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = [c for c in string.printable if c not in "\x0b\x0c\r"]
    alphabet = ["▁" if c == " " else c for c in alphabet]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    return hf_tok


def make_tiny_model(
    tmp_dir: str | os.PathLike[str],
    arch: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int = 400,
    chat_template: str | None = CHATML_TEMPLATE,
    **config_overrides: Any,
) -> str:
    """Save a tiny random `arch` model plus tokenizer into `tmp_dir`; return the folder path.

    `config_overrides` are passed to `AutoConfig.for_model` (e.g. `num_hidden_layers=3`,
    `max_position_embeddings=256`). The weights are float32 safetensors seeded by `seed`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(tmp_dir)
    os.makedirs(path, exist_ok=True)
    tokenizer = make_tiny_tokenizer(vocab_size=vocab_size, chat_template=chat_template)
    config_kwargs: dict[str, Any] = dict(TINY_SHAPES)
    config_kwargs.update(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config_kwargs.update(config_overrides)
    config = AutoConfig.for_model(arch, **config_kwargs)
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(rng_state)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
