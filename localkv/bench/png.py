"""A PNG encoder for RGB images held in numpy arrays: signature, IHDR, one zlib IDAT, IEND (PNG spec, ch. 5)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(tag: bytes, data: bytes) -> bytes:
    # length (4 bytes, big-endian), type, data, CRC-32 of type + data
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {pixels.shape} {pixels.dtype}")
    h, w, _ = pixels.shape
    # IHDR: width, height, bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    # Each scanline starts with its filter type; 0 (None) keeps the encoder trivial.
    raw = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, w * 3)], axis=1).tobytes()
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image to ``path``."""
    Path(path).write_bytes(encode_png(pixels))
