"""Load a Llama-family model from a GGUF file: `ModelArgs`, a dequantized state dict and the metadata.

Tensors are read through ``gguf.GGUFReader`` (a memory map) and dequantized with ``gguf.quants.dequantize``,
one at a time, then cast to the requested dtype, so peak memory is the result plus one fp32 tensor.
llama.cpp's names are mapped to ours (Hugging Face's less ``model.``), and the row permutation its
converter applies to the Q and K projections of ``llama`` models is undone, so the weights come out in
the rotate-half layout `localkv.models.rope` expects.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelFormatError
from .args import SUPPORTED_ARCHITECTURES, ModelArgs

# llama.cpp tensor name (after ``blk.N.``) -> our parameter name (after ``layers.N.``).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
# Tensors some converters write that the model does not use (precomputed RoPE tables, frequency factors).
_IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """Our parameter name for a llama.cpp tensor name (``blk.3.attn_q.weight`` -> ``layers.3.self_attn.q_proj.weight``).

    None for a tensor that is not part of a Llama-family model.
    """
    if m := _BLOCK_RE.match(gguf_name):
        layer, kind, suffix = m.groups()
        return f"layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}" if kind in _BLOCK_NAMES else None
    stem, _, suffix = gguf_name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{suffix}" if stem in _TOP_NAMES else None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> Hugging Face rotate-half).

    Within each head of width D, Hugging Face rows are [x_0 .. x_{D/2-1}, y_0 .. y_{D/2-1}], where RoPE
    rotates the pair (x_i, y_i). llama.cpp's converter (``LlamaModel.permute``) reorders them to
    [x_0, y_0, x_1, y_1, ...] so that pairs are adjacent (GGML's "normal" RoPE). With the rows of one
    head viewed as (D/2, 2) = (pair i, member j), the GGUF row i*2 + j becomes HF row j*D/2 + i:

        (H*D, in) -> (H, D/2, 2, in) -swap(1,2)-> (H, 2, D/2, in) -> (H*D, in)

    The same holds for 1-D biases (``in`` absent). ``n_heads`` is the query heads for Q and the
    key/value heads for K.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _fail(path: Path, what: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: {what}")


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise _fail(path, "no such GGUF file" if not path.exists() else "not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise _fail(path, "not a GGUF file (no GGUF magic at the start)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/... on truncated or corrupt files
        msg = " ".join(str(exc).split())
        raise _fail(path, f"truncated or corrupt GGUF file ({size:,} bytes; the reader failed with "
                          f"{type(exc).__name__}: {msg})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise _fail(path, f"truncated GGUF file: tensor {t.name} needs bytes up to "
                              f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value of an open ``GGUFReader`` as plain Python values (its ``GGUF.*`` header keys left out)."""
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            out[key] = field.contents()
    return out


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a GGUF file (as `load_gguf` returns it) without reading any tensor data."""
    return read_metadata(_open(Path(path)))


def _rope_scaling(path: Path, md: dict[str, Any], arch: str, freq_factors: np.ndarray | None, theta: float,
                  head_dim: int) -> dict[str, Any] | None:
    p = f"{arch}.rope.scaling."
    kind = md.get(p + "type")
    if kind in ("linear", "yarn"):
        s: dict[str, Any] = {"rope_type": kind, "factor": float(md.get(p + "factor", 1.0))}
        if (orig := md.get(p + "original_context_length")) is not None:
            s["original_max_position_embeddings"] = int(orig)
        for src, dst in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (v := md.get(p + src)) is not None:
                s[dst] = float(v)
        if kind == "yarn" and (v := md.get(p + "attn_factor")) not in (None, 1.0):
            s["attention_factor"] = float(v)
        return s
    if kind not in (None, "none"):
        raise _fail(path, f"RoPE scaling type {kind!r} is not supported (localkv runs: linear, yarn, llama3)")
    if freq_factors is not None:
        return _llama3_from_factors(path, freq_factors, theta, head_dim)
    return None


def _llama3_from_factors(path: Path, factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3.1+ GGUFs carry their RoPE scaling as ``rope_freqs.weight``: one divisor per frequency.

    llama3 scaling divides inv_freq by 1 (short wavelengths), by ``factor`` (long ones) and by a blend
    between. In the blend, 1/divisor = (1 - s)/factor + s with s = (L/wavelen - low)/(high - low), which
    is linear in 1/wavelen; we take factor = max divisor, assume the usual trained length L = 8192 and
    solve low/high from the blended frequencies, then check the rebuilt divisors match.
    """
    from .rope import _default_inv_freq, _llama3_inv_freq

    factors = factors.astype(np.float64)
    factor = float(factors.max())
    inv = _default_inv_freq(theta, head_dim).double().numpy()
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    mid = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    if mid.sum() >= 2 and factor > 1:
        # s = a * (1/wavelen) + b, with a = L/(high - low), b = -low/(high - low).
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv[mid] / (2 * math.pi), s, 1)
        span = 8192 / a
        scaling["low_freq_factor"], scaling["high_freq_factor"] = float(-b * span), float(-b * span + span)
    rebuilt = inv / _llama3_inv_freq(torch.from_numpy(inv), scaling).numpy()
    if not np.allclose(rebuilt, factors, rtol=1e-3, atol=1e-3):
        raise _fail(path, "tensor rope_freqs.weight does not match Llama 3 RoPE scaling; cannot run this RoPE")
    return scaling


def _args(path: Path, md: dict[str, Any], shapes: dict[str, tuple[int, ...]],
          freq_factors: np.ndarray | None) -> ModelArgs:
    gguf_arch = md.get("general.architecture")
    if gguf_arch not in SUPPORTED_ARCHITECTURES:
        raise _fail(path, f"architecture {gguf_arch!r} is not supported (localkv runs: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    arch = gguf_arch
    # llama.cpp writes Mistral models as "llama"; transformers tells them apart by name.
    if arch == "llama" and "mistral" in str(md.get("general.name", "")).lower():
        arch = "mistral"

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{gguf_arch}.{key}", default)

    try:
        dim, n_layers, n_heads = get("embedding_length"), get("block_count"), get("attention.head_count")
        if None in (dim, n_layers, n_heads, get("feed_forward_length")):
            raise KeyError("embedding_length, block_count, attention.head_count or feed_forward_length")
        n_kv = get("attention.head_count_kv", n_heads)
        q_rows = shapes.get("blk.0.attn_q.weight", (n_heads * (dim // n_heads),))[0]
        head_dim = get("attention.key_length") or q_rows // n_heads
        # The embedding's rows are the model's vocabulary; some converters pad it past the token list.
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = shapes["token_embd.weight"][0] if "token_embd.weight" in shapes else len(tokens or ())
        eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id") if md.get(k) is not None]
        theta = float(get("rope.freq_base", 10000.0))
        return ModelArgs(
            arch=arch, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            ffn_dim=get("feed_forward_length"), vocab_size=vocab,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
            rope_scaling=_rope_scaling(path, md, gguf_arch, freq_factors, theta, head_dim),
            max_seq_len=get("context_length", 4096),
            tie_embeddings="output.weight" not in shapes,
            qkv_bias="blk.0.attn_q.bias" in shapes, o_bias="blk.0.attn_output.bias" in shapes,
            mlp_bias="blk.0.ffn_up.bias" in shapes,
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=list(dict.fromkeys(int(i) for i in eos)),
            torch_dtype=None,
        )
    except KeyError as exc:
        raise _fail(path, f"metadata lacks {gguf_arch}.{exc.args[0]}") from None


def _tensor(path: Path, t, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of its logical shape (rows, cols) in ``dtype``."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    # GGUF lists dimensions fastest-first (ne0 = columns); torch wants them slowest-first.
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data)).reshape(shape).to(dtype)
    if t.tensor_type == Q.BF16:
        raw = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1))
        return raw.view(torch.bfloat16).reshape(shape).to(dtype)
    if t.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64, Q.F64):
        raise _fail(path, f"tensor {t.name} has type {t.tensor_type.name}, not a weight type localkv can load")
    try:
        w = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise _fail(path, f"tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                          f"cannot dequantize") from None
    return torch.from_numpy(w).reshape(shape).to(dtype)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32
              ) -> tuple[ModelArgs, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a GGUF model file.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the returned weights (quantized tensors are dequantized through fp32 first).

    Returns:
        ``(args, state_dict, metadata)``: the model's `ModelArgs` (``eos_token_id`` lists the file's EOS,
        EOT and EOM tokens; RoPE scaling from ``rope.scaling.*`` or, for Llama 3.1+, from the
        ``rope_freqs`` tensor); its weights on the CPU under our
        parameter names (``layers.0.self_attn.q_proj.weight`` ...; no ``lm_head.weight`` when the
        embeddings are tied); and every metadata key of the file as plain Python values (including
        ``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

    Raises:
        ModelFormatError: missing, truncated or non-GGUF file, unsupported architecture, or a tensor
            type that cannot be dequantized.
    """
    path = Path(path)
    reader = _open(path)
    md = read_metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    freq = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    freq_factors = _tensor(path, freq, torch.float32).numpy() if freq is not None else None
    args = _args(path, md, shapes, freq_factors)
    # llama.cpp permutes Q/K only for the "llama" architecture (it runs those with GGML's interleaved
    # RoPE); Qwen2 uses the NeoX (rotate-half) RoPE and is stored as Hugging Face has it.
    permuted = md["general.architecture"] in ("llama", "mistral")

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        name = hf_name(t.name)
        if name is None:
            raise _fail(path, f"tensor {t.name} is not part of a {args.arch} model")
        w = _tensor(path, t, dtype)
        if permuted and ".attn_q." in t.name:
            w = unpermute_qk(w, args.n_heads)
        elif permuted and ".attn_k." in t.name:
            w = unpermute_qk(w, args.n_kv_heads)
        state[name] = w
    expected = {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(args.n_layers) for n in _BLOCK_NAMES.values()}
    if missing := sorted(expected - state.keys()):
        raise _fail(path, f"missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return args, state, md
