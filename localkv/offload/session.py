"""Chat sessions on disk: the conversation and its KV, resumed without recomputing the prefill.

    PATH/manifest.json        what the session is: model fingerprint, token ids, messages, page checksums,
                              and which generation directory holds the pages
    PATH/gen-NNNN/layer_LLL.kv  the KV of layer LLL: page i (``page_tokens`` tokens, (2, Hkv, P, D)) at byte
                              i * page_bytes; the last page may be partly filled

A save writes a new generation directory, fsyncs it, then replaces the manifest atomically (temp file, fsync,
rename, fsync of the directory) and only then deletes older generations: a process killed at any moment
leaves the previous save loadable. Loading checks every page's crc32 before anything is used and refuses,
naming the page, when one is corrupt or a file is short; it never writes to the session.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch

from ..errors import UserError
from ..models.args import ModelArgs

FORMAT = "localkv-session"
VERSION = 1
PAGE_TOKENS = 256


def fingerprint(args: ModelArgs, source: Path) -> dict:
    """What must match between the model that saved a session and the one resuming it."""
    return {"arch": args.arch, "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "n_kv_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
            "rope_theta": args.rope_theta, "source": source.name}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def save(path: Path, cache, ids: list[int], messages: list[dict], model: dict, extra: dict | None = None) -> None:
    """Write ``cache`` (its first ``len(ids)`` tokens) and the conversation to ``path`` atomically."""
    path = Path(path).expanduser()
    n_tokens = len(ids)
    # Asked for before anything is written: a cache that cannot export its KV says so here (UserError).
    exports = [cache.export_pages(layer, n_tokens, PAGE_TOKENS) for layer in range(cache.n_layers)]
    try:
        path.mkdir(parents=True, exist_ok=True)
        old = sorted(p for p in path.glob("gen-*") if p.is_dir())
        number = int(old[-1].name[4:]) + 1 if old else 1
        gen = path / f"gen-{number:04d}"
        shutil.rmtree(gen, ignore_errors=True)
        gen.mkdir()
        checksums = []
        dtype = None
        for layer, pages in enumerate(exports):
            sums = []
            with open(gen / f"layer_{layer:03d}.kv", "wb") as f:
                for page in pages:  # (2, Hkv, P, D) on any device
                    data = page.cpu()
                    dtype = data.dtype
                    view = _bytes(data)
                    f.write(view)
                    sums.append(zlib.crc32(view))
                f.flush()
                os.fsync(f.fileno())
            checksums.append(sums)
        _fsync_dir(gen)
        manifest = {"format": FORMAT, "version": VERSION, "generation": gen.name, "model": model,
                    "kv_dtype": str(dtype).removeprefix("torch.") if dtype else None, "page_tokens": PAGE_TOKENS,
                    "tokens": n_tokens, "ids": list(ids), "messages": messages, "checksums": checksums,
                    **(extra or {})}
        tmp = path / "manifest.json.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / "manifest.json")
        _fsync_dir(path)
    except OSError as e:
        raise UserError(f"cannot save the session to {path}: {e.strerror or e}") from None
    for g in old:  # the new manifest is durable: older generations can go
        shutil.rmtree(g, ignore_errors=True)


def read_manifest(path: Path) -> dict:
    path = Path(path).expanduser()
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a saved session (no manifest.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the session manifest {path / 'manifest.json'}: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{path} is not a localkv session this version can read")
    return manifest


def load_pages(path: Path, manifest: dict, geometry: tuple[int, int, int], dtype: torch.dtype):
    """Yield (layer, pages (n, 2, Hkv, P, D) CPU tensor) after checking every page; raises on corruption."""
    path = Path(path).expanduser()
    n_layers, n_kv_heads, head_dim = geometry
    P = manifest["page_tokens"]
    shape = (2, n_kv_heads, P, head_dim)
    page_bytes = 2 * n_kv_heads * P * head_dim * dtype.itemsize
    gen = path / manifest["generation"]
    # Check everything first: a corrupt page must not leave a half-loaded session behind.
    for layer, sums in enumerate(manifest["checksums"]):
        file = gen / f"layer_{layer:03d}.kv"
        size = file.stat().st_size if file.is_file() else -1
        if size < len(sums) * page_bytes:
            raise UserError(f"session page file {file} is missing or truncated "
                            f"({max(size, 0):,} of {len(sums) * page_bytes:,} bytes)")
        with open(file, "rb") as f:
            for i, expected in enumerate(sums):
                if zlib.crc32(f.read(page_bytes)) != expected:
                    raise UserError(f"session page {i} of layer {layer} in {file} is corrupt (checksum mismatch)")
    for layer in range(n_layers):
        data = (gen / f"layer_{layer:03d}.kv").read_bytes()
        n = len(manifest["checksums"][layer])
        pages = torch.frombuffer(bytearray(data[:n * page_bytes]), dtype=dtype).reshape(n, *shape)
        yield layer, pages
