"""Builds tiny random Llama checkpoints with a real BPE tokenizer, offline, in seconds.

The ``model: tiny`` of the ``*-tiny.yaml`` recipes, and the implementation behind
``tests/tiny_model.py`` (so tests and recipes train the same kind of model)::

    path = build_tiny_model(tmp_path / "tiny")             # ChatML template
    path = build_tiny_model(tmp_path / "raw", chat_template=False)
"""

from __future__ import annotations

import json
from pathlib import Path

from steerserve.prompts import ATTRIBUTE_TURN, MCQ_LETTERS, SYSTEM_TURN, TURN

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Plain added tokens, not special: detokenizers keep them, so the "<extra_id_1>" stop string is seen.
STEERLM_TOKENS = [SYSTEM_TURN, TURN, ATTRIBUTE_TURN]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "Question: What is the capital of France? Answer: Paris is the capital.",
    "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4",
    "User Assistant System Explanation: because the answer follows from the question.",
    "Hello world! How are you today? I am fine, thank you. Numbers 0 1 2 3 4 5 6 7 8 9.",
    " ".join(f"Answer: {letter}" for letter in MCQ_LETTERS),
]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tokenizer


def build_tiny_model(
    path: Path, *, chat_template: bool = True, vocab_size: int = 512, seed: int = 0, hidden_size: int = 64
) -> Path:
    """Write config, random bf16 weights and tokenizer to ``path``; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.add_tokens(STEERLM_TOKENS, special_tokens=False)
    for letter in MCQ_LETTERS:  # the MCQ scorer needs each " A" to be one token
        assert len(tokenizer.encode(f" {letter}", add_special_tokens=False)) == 1, letter
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=hidden_size // 2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    (path / "tiny_model.json").write_text(json.dumps({"seed": seed, "chat_template": chat_template}))
    return path
