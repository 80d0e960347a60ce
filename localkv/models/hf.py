"""Loading a Hugging Face model directory: config.json, one or sharded *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..errors import ModelFormatError
from .args import ModelArgs


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from None


def read_args(model_dir: Path) -> ModelArgs:
    """ModelArgs from ``config.json`` (and ``generation_config.json`` for extra end-of-sequence ids)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    gen_path = model_dir / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    try:
        return ModelArgs.from_hf_config(_read_json(config_path), gen)
    except KeyError as e:
        raise ModelFormatError(f"{config_path} lacks the field {e.args[0]!r}") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the weights: the shards named by the index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelFormatError(f"shard listed in {index.name} is missing: {missing[0]}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{model_dir} has no *.safetensors weights")
    return files


def iter_weights(model_dir: Path, device: torch.device, dtype: torch.dtype
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs straight onto ``device`` in ``dtype``, names without the leading ``model.``."""
    for path in weight_files(model_dir):
        size = path.stat().st_size
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name.removeprefix("model."), tensor.to(dtype)
        except ModelFormatError:
            raise
        except Exception as e:  # safetensors raises its own error type for a short or corrupt file
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelFormatError(f"cannot read weights from {path} ({size:,} bytes): {msg}") from None
