"""Tiny random-weight models written to disk as real Hugging Face directories, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

_CORPUS = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
           "Long context models keep their KV cache on the GPU, in pinned memory and on disk. "
           "Héllo wörld, naïve café, 東京, emoji 🙂🚀. 0123456789 ") * 20


def write_tokenizer(path: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML,
              "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def write_model(path: Path, model_type: str = "qwen2", *, layers: int = 2, dim: int = 64, heads: int = 4,
                kv_heads: int = 2, vocab: int = 320, max_shard_size: str | None = "40KB", seed: int | None = None,
                **extra) -> Path:
    """Save a random model of ``model_type`` (llama, mistral, qwen2) with its tokenizer under ``path``."""
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, vocab)
    with open(path / "tokenizer.json") as f:
        eos_id = json.load(f)["model"]["vocab"].get("<|im_end|>", 2)
    cfg = dict(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               intermediate_size=dim * 2, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=model_type == "qwen2", eos_token_id=eos_id,
               bos_token_id=None)
    cfg.update(extra)
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # random init is tiny; widen it so logits are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path
