"""Named architecture shapes for benchmarks with random weights: the dimensions of real models, no download.

Speed does not depend on the weights' values, so a random-weight model of a real architecture measures what
the real model would cost (the lead's GPU runs use ``llama3-8b``; CI uses ``smollm2-135m``).
"""

from __future__ import annotations

from ..errors import UserError
from ..models.args import ModelArgs

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    # meta-llama/Llama-3.1-8B: 8.0B parameters, 128K trained context.
    "llama3-8b": dict(arch="llama", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                      rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
    # meta-llama/Llama-3.2-1B: 1.2B parameters, tied embeddings, head dim 64.
    "llama3.2-1b": dict(arch="llama", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                        vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                        tie_embeddings=True, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    # HuggingFaceTB/SmolLM2-135M: the embedded default's architecture.
    "smollm2-135m": dict(arch="llama", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         vocab_size=49152, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
                         tie_embeddings=True),
}


def shape_args(name: str) -> ModelArgs:
    """The ``ModelArgs`` of a named shape (``llama3-8b``, ``llama3.2-1b``, ``smollm2-135m``)."""
    try:
        return ModelArgs(**SHAPES[name.lower()])
    except KeyError:
        raise UserError(f"unknown shape {name!r} (available: {', '.join(SHAPES)})") from None
