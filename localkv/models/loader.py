"""One entry point for every model source: an embedded name, a GGUF file or a Hugging Face directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ModelFormatError, UserError
from . import hf
from .args import ModelArgs
from .llama import Transformer
from .rope import Rope

if TYPE_CHECKING:
    from .chat_template import ChatTemplate
    from .tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model ready to run: weights on their device, its tokenizer and chat template."""

    args: ModelArgs
    model: Transformer
    tokenizer: Tokenizer
    template: ChatTemplate | None
    source: Path
    format: str
    """``gguf`` or ``safetensors``."""

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn: the template's end-of-turn and every eos id."""
        ids = list(self.args.eos_token_id)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if self.template is not None:
            ids.extend(self.template.end_of_turn(self.tokenizer))
        return sorted(set(ids))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (None: `default_device`); a one-line UserError for a name torch does not know
    or a CUDA device this machine does not have."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"unknown device {device!r} ({str(e).splitlines()[0]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(device)!r}: no CUDA GPU is available here "
                        f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'})")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 matmuls on a CPU are slow and imprecise; on a GPU bf16 is what the weights are published in.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(args: ModelArgs, weights, device: torch.device, dtype: torch.dtype, source: Path
                ) -> Transformer:
    """A Transformer with ``weights`` ((name, tensor) pairs) assigned, nothing allocated twice."""
    with torch.device("meta"):
        model = Transformer(args)
    state = dict(weights)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict().keys())
    if args.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelFormatError(f"{source} lacks weight {missing[0]!r} ({len(missing)} missing in all)")
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(model.get_parameter(name).shape):
            raise ModelFormatError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(model.get_parameter(name).shape)}")
    model.load_state_dict({k: v.to(device, dtype) for k, v in state.items() if k in expected},
                          strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = Rope(args, device)
    return model.eval().requires_grad_(False).fuse()


def _load_hf_dir(path: Path, device, dtype) -> LoadedModel:
    from .chat_template import ChatTemplate
    from .tokenizer import Tokenizer

    args = hf.read_args(path)
    tok_json = path / "tokenizer.json"
    if not tok_json.is_file():
        raise ModelFormatError(f"{path} has no tokenizer.json")
    tok_config = path / "tokenizer_config.json"
    tokenizer = Tokenizer.from_files(tok_json, tok_config if tok_config.is_file() else None)
    model = build_model(args, hf.iter_weights(path, device, dtype), device, dtype, path)
    source = tokenizer.chat_template
    jinja = path / "chat_template.jinja"
    if source is None and jinja.is_file():
        source = jinja.read_text()
    if source is None and (path / "chat_template.json").is_file():
        source = json.loads((path / "chat_template.json").read_text()).get("chat_template")
    template = ChatTemplate(source, tokenizer.bos_token, tokenizer.eos_token) if source else None
    return LoadedModel(args, model, tokenizer, template, path, "safetensors")


def _load_gguf(path: Path, device, dtype) -> LoadedModel:
    from .chat_template import ChatTemplate
    from .gguf import load_gguf
    from .tokenizer import Tokenizer

    args, state, meta = load_gguf(path, dtype)
    tokenizer = Tokenizer.from_gguf(meta)
    model = build_model(args, state.items(), device, dtype, path)
    source = tokenizer.chat_template
    template = ChatTemplate(source, tokenizer.bos_token, tokenizer.eos_token) if source else None
    return LoadedModel(args, model, tokenizer, template, path, "gguf")


def load_model(model: str | Path | None = None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a model by embedded name (default ``smollm2-135m``), GGUF path or Hugging Face directory."""
    from .hub import DEFAULT_MODEL, resolve

    path = resolve(model if model is not None else DEFAULT_MODEL)
    device = parse_device(device)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    dtype = dtype or default_dtype(device)
    if not path.exists():
        raise ModelFormatError(f"{path} does not exist")
    if path.is_dir():
        return _load_hf_dir(path, device, dtype)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return _load_gguf(path, device, dtype)
    raise ModelFormatError(f"{path} is neither a GGUF file nor a Hugging Face model directory")


def read_model_args(model: str | Path | None = None) -> tuple[ModelArgs, Path, str, str | None]:
    """The model's dimensions and chat template without loading its weights (for ``info`` and ``plan``).

    Returns (args, path, format, chat template source or None).
    """
    from .hub import DEFAULT_MODEL, resolve

    path = resolve(model if model is not None else DEFAULT_MODEL)
    if not path.exists():
        raise ModelFormatError(f"{path} does not exist")
    if path.is_dir():
        config = path / "tokenizer_config.json"
        template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
        return hf.read_args(path), path, "safetensors", template
    from .gguf import _args, _open, read_metadata

    reader = _open(path)
    md = read_metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return _args(path, md, shapes, None), path, "gguf", md.get("tokenizer.chat_template")


def describe(model: str | Path | None = None) -> dict[str, str]:
    """What ``localkv info`` prints: architecture, parameters, trained context, dtype, template."""
    from ..units import format_bytes

    args, path, fmt, template = read_model_args(model)
    first = (template or "").strip().splitlines()
    return {
        "model": str(path),
        "format": fmt,
        "architecture": args.arch,
        "parameters": f"{args.n_params() / 1e9:.2f}B" if args.n_params() >= 1e9 else f"{args.n_params() / 1e6:.0f}M",
        "layers": str(args.n_layers),
        "heads": f"{args.n_heads} query, {args.n_kv_heads} key/value, head dim {args.head_dim}",
        "trained context": f"{args.max_seq_len:,} tokens",
        "rope": f"theta {args.rope_theta:g}" + (f", {args.rope_scaling['rope_type']} scaling"
                                                 if args.rope_scaling else ""),
        "dtype": args.torch_dtype or ("quantized GGUF (dequantized on load)" if fmt == "gguf" else "unknown"),
        "kv per token": f"{format_bytes(args.kv_bytes_per_token)} (bf16, all layers)",
        "chat template": (first[0][:70] + " ...") if first else "none (ChatML is used)",
    }


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    from ..errors import UserError

    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {name!r} (use one of: fp32, fp16, bf16)") from None
