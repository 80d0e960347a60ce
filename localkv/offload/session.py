"""Chat sessions on disk: the conversation and its KV, resumed without recomputing the prefill.

    PATH/manifest.json          what the session is: model fingerprint, token ids, messages, page checksums,
                                which generation directory holds the pages, and an interrupted message, if any
    PATH/gen-NNNN/layer_LLL.kv  the full pages of layer LLL: page i (``page_tokens`` tokens, (2, Hkv, P, D)) at
                                byte i * page_bytes
    PATH/tail-NNNN.kv           the last, partly filled page of every layer (layer l's at byte l * page_bytes)

A save whose tokens extend the saved ones (the same model, the saved ids a prefix of the new) appends only the
new full pages to the generation's files and writes a new tail file: saving a growing conversation, or a long
prefill every so often (`runtime.chat`), writes each page once. Any other save writes a new generation. Either
way the files the current manifest names are never changed: new bytes go past the pages it counts, into a new
tail file or a new generation, are fsynced, and then the manifest is replaced atomically (temp file, fsync,
rename, fsync of the directory); only then do older generations and tail files go. A process killed at any
moment leaves the previous save loadable. Loading checks every page's crc32 before anything is used and
refuses, naming the page, when one is corrupt or a file is short; it never writes to the session.
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
VERSION = 2
READS = (1, 2)   # version 1 kept the partial page at the end of the layer files, without a tail file
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


def _extends(path: Path, model: dict, ids: list[int]) -> dict | None:
    """The saved manifest a save of ``ids`` can append to: same model and page size, its ids a prefix."""
    try:
        old = read_manifest(path)
    except UserError:
        return None
    n = old["tokens"]
    ok = (old["version"] == VERSION and old["model"] == model and old["page_tokens"] == PAGE_TOKENS
          and n <= len(ids) and old["ids"] == list(ids[:n]) and (path / old["generation"]).is_dir())
    return old if ok else None


def _number(path: Path, prefix: str) -> int:
    """The next free NNNN of ``prefix-NNNN`` in ``path``."""
    taken = [int(p.name[len(prefix) + 1:len(prefix) + 5]) for p in path.glob(f"{prefix}-*")
             if p.name[len(prefix) + 1:len(prefix) + 5].isdigit()]
    return max(taken, default=0) + 1


def save(path: Path, cache, ids: list[int], messages: list[dict], model: dict, extra: dict | None = None) -> None:
    """Write ``cache`` (its first ``len(ids)`` tokens) and the conversation to ``path`` atomically, appending to
    the saved pages when the conversation extends them."""
    path = Path(path).expanduser()
    n_tokens, P = len(ids), PAGE_TOKENS
    full = n_tokens // P
    old = _extends(path, model, ids)
    # Asked for before anything is written: a cache that cannot export its KV says so here (UserError).
    exports = [cache.export_pages(layer, n_tokens, P) for layer in range(cache.n_layers)]
    try:
        path.mkdir(parents=True, exist_ok=True)
        if old is not None:
            gen = path / old["generation"]
        else:
            gen = path / f"gen-{_number(path, 'gen'):04d}"
            shutil.rmtree(gen, ignore_errors=True)
            gen.mkdir()
        tail = path / f"tail-{_number(path, 'tail'):04d}.kv" if n_tokens % P else None
        checksums, tail_sums = [], []
        dtype = None
        kept_bytes = 0   # bytes of one page in the files being extended
        if old is not None:
            kept_bytes = 2 * model["n_kv_heads"] * P * model["head_dim"] * getattr(torch, old["kv_dtype"]).itemsize
        tail_file = open(tail, "wb") if tail is not None else None
        try:
            for layer, pages in enumerate(exports):
                kept = old["checksums"][layer] if old is not None else []
                sums = list(kept)
                with open(gen / f"layer_{layer:03d}.kv", "r+b" if old is not None else "wb") as f:
                    f.truncate(len(kept) * kept_bytes)   # what a killed save left past the pages counted
                    f.seek(0, os.SEEK_END)
                    for i, page in enumerate(pages):   # (2, Hkv, P, D) on any device
                        if i < len(kept):
                            continue
                        data = page.cpu()
                        if dtype is None:
                            dtype = data.dtype
                        view = _bytes(data)
                        if i < full:
                            f.write(view)
                            sums.append(zlib.crc32(view))
                        else:
                            tail_file.write(view)
                            tail_sums.append(zlib.crc32(view))
                    f.flush()
                    os.fsync(f.fileno())
                checksums.append(sums)
            if tail_file is not None:
                tail_file.flush()
                os.fsync(tail_file.fileno())
        finally:
            if tail_file is not None:
                tail_file.close()
        if old is not None and dtype is not None and str(dtype).removeprefix("torch.") != old["kv_dtype"]:
            raise UserError(f"cannot extend the session in {path}: its KV is {old['kv_dtype']}, this is {dtype}")
        _fsync_dir(gen)
        manifest = {"format": FORMAT, "version": VERSION, "generation": gen.name, "model": model,
                    "kv_dtype": (str(dtype).removeprefix("torch.") if dtype else old and old["kv_dtype"]),
                    "page_tokens": P, "tokens": n_tokens, "ids": list(ids), "messages": messages,
                    "checksums": checksums, "tail": tail.name if tail else None, "tail_checksums": tail_sums,
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
    for g in path.glob("gen-*"):   # the new manifest is durable: what it does not name can go
        if g.is_dir() and g != gen:
            shutil.rmtree(g, ignore_errors=True)
    for t in path.glob("tail-*.kv"):
        if t != tail:
            t.unlink(missing_ok=True)


def read_manifest(path: Path) -> dict:
    path = Path(path).expanduser()
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a saved session (no manifest.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the session manifest {path / 'manifest.json'}: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") not in READS:
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
    tail = path / manifest["tail"] if manifest.get("tail") else None
    tail_sums = manifest.get("tail_checksums") or []
    # Check everything first: a corrupt page must not leave a half-loaded session behind.
    checks = [(gen / f"layer_{layer:03d}.kv", 0, sums, layer) for layer, sums in enumerate(manifest["checksums"])]
    if tail is not None:
        checks += [(tail, layer * page_bytes, [expected], layer) for layer, expected in enumerate(tail_sums)]
    for file, offset, sums, layer in checks:
        size = file.stat().st_size if file.is_file() else -1
        if size < offset + len(sums) * page_bytes:
            raise UserError(f"session page file {file} is missing or truncated "
                            f"({max(size, 0):,} of {offset + len(sums) * page_bytes:,} bytes)")
        with open(file, "rb") as f:
            f.seek(offset)
            for i, expected in enumerate(sums):
                if zlib.crc32(f.read(page_bytes)) != expected:
                    what = "the last page" if file == tail else f"page {i}"
                    raise UserError(f"session {what} of layer {layer} in {file} is corrupt (checksum mismatch)")
    tail_data = tail.read_bytes() if tail is not None else b""
    for layer in range(n_layers):
        n = len(manifest["checksums"][layer])
        with open(gen / f"layer_{layer:03d}.kv", "rb") as f:
            data = bytearray(f.read(n * page_bytes))
        if tail is not None:
            data += tail_data[layer * page_bytes:(layer + 1) * page_bytes]
            n += 1
        yield layer, torch.frombuffer(data, dtype=dtype).reshape(n, *shape)
