"""The ``.pcz`` container: a small binary layout that never unpickles, and the bit-level codecs.

Layout (all integers little-endian)::

    offset      size  field
    0           8     signature  b"\\x89PCZ\\r\\n\\x1a\\n"  (PNG-style: catches text-mode mangling)
    8           2     format version (u16), currently 1
    10          2     flags (u16), bit 0 = the manifest is zlib-compressed (always set by version 1)
    12          4     M: manifest length in bytes (u32)
    16          8     P: payload length in bytes (u64)
    24          M     manifest: UTF-8 JSON (zlib-compressed when flag bit 0 is set)
    24 + M      P     payload: the encoded tensors back to back (offsets in the manifest)
    24 + M + P  32    SHA-256 of bytes [0, 24 + M + P): signature, header, manifest and payload

The first 24 bytes and the trailing SHA-256 keep this meaning in every format version, so any
reader can tell a truncated or altered file from a newer one before it parses anything else.
A file is therefore exactly ``56 + M + P`` bytes. The manifest (see ``pycompress.export.artifact``)
says how to rebuild the model and how each tensor is encoded; a third party can read a file with
``read_container`` or with the 20 lines of Python this docstring describes.

Bit-level codecs (the payload's building blocks):

* packed mask: ``pycompress.ops.pack_mask``'s layout, bit ``i % 8`` of byte ``i // 8`` is element
  ``i`` (row-major), whole 32-bit words (``ceil(n / 32) * 4`` bytes), padding bits 0;
* integer codes at ``b`` bits (``pack_codes``): ``u = code - qmin`` in ``[0, 2^b - 1]``, element
  ``i`` in bits ``[i*b, (i+1)*b)`` of a little-endian bit stream (least significant bit first),
  padded with 0 bits to whole bytes; so 4-bit codes are two per byte, low nibble first. 8-bit and
  16-bit codes are stored as the plain integer types instead: int8 / little-endian int16 when
  qmin < 0 (signed grids), uint8 / uint16 otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from typing import Any, Dict, Tuple

import numpy as np

__all__ = [
    "SIGNATURE",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "TRAILER_BYTES",
    "ArtifactError",
    "write_container",
    "read_container",
    "container_bytes",
    "pack_codes",
    "unpack_codes",
    "pack_bool",
    "unpack_bool",
    "mask_bytes",
    "code_bytes",
]

SIGNATURE = b"\x89PCZ\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER_BYTES = 24
TRAILER_BYTES = 32
_FLAG_ZLIB = 1
_HEADER = struct.Struct("<8sHHIQ")


class ArtifactError(ValueError):
    """A file is not a readable pycompress artifact (truncated, altered, newer, not one at all, or a
    model this installation cannot rebuild); the message names the file and the problem."""


# ----------------------------------------------------------------------------------- container
def container_bytes(manifest: Dict[str, Any], payload: bytes) -> bytes:
    """The whole file for ``manifest`` (a JSON-serialisable dict) and ``payload``."""
    text = json.dumps(manifest, separators=(",", ":"), sort_keys=False, allow_nan=False).encode("utf-8")
    packed = zlib.compress(text, 9)
    head = _HEADER.pack(SIGNATURE, FORMAT_VERSION, _FLAG_ZLIB, len(packed), len(payload))
    body = head + packed + bytes(payload)
    return body + hashlib.sha256(body).digest()


def write_container(path: str, manifest: Dict[str, Any], payload: bytes, *, force: bool = False) -> int:
    """Write atomically (temp file + rename); refuse to replace an existing file unless ``force``.
    Returns the file's size in bytes."""
    from ..utils import atomic_write_bytes

    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to overwrite it")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give a file name such as model.pcz")
    data = container_bytes(manifest, payload)
    atomic_write_bytes(path, data)
    return len(data)


def _sniff(data: bytes) -> str:
    if data[:2] == b"PK":
        return " (it looks like a zip archive: a torch.save checkpoint? evaluate those with `pycompress eval`)"
    if data[:1] == b"\x80":
        return " (it looks like a Python pickle)"
    if data[:8].isascii() and data[:1] in (b"{", b"[", b"#", b"<"):
        return " (it looks like a text file)"
    return ""


def read_container(path: str) -> Tuple[Dict[str, Any], bytes, Dict[str, Any]]:
    """``(manifest, payload, facts)`` of a ``.pcz`` file, with every structural check done in the
    order that gives the clearest message: signature, length, checksum, version, manifest."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a directory, not an artifact file") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read: {exc}") from None
    if data[: len(SIGNATURE)] != SIGNATURE:
        if len(data) < len(SIGNATURE) and SIGNATURE.startswith(data) and data:
            raise ArtifactError(f"{path}: truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
        raise ArtifactError(f"{path}: not a pycompress artifact (no PCZ signature){_sniff(data)}")
    if len(data) < HEADER_BYTES:
        raise ArtifactError(f"{path}: truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    _, version, flags, m, p = _HEADER.unpack_from(data)
    want = HEADER_BYTES + m + p + TRAILER_BYTES
    if len(data) < want:
        raise ArtifactError(f"{path}: truncated: the header announces {want:,} bytes, the file has {len(data):,}")
    if len(data) > want:
        raise ArtifactError(
            f"{path}: corrupt: {len(data) - want:,} unexpected bytes after the announced "
            f"{want:,} (was something appended?)"
        )
    body, digest = data[:-TRAILER_BYTES], data[-TRAILER_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise ArtifactError(
            f"{path}: checksum mismatch: the SHA-256 stored in the file does not match its "
            f"contents, so the file was altered or damaged after it was written"
        )
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: written in artifact format version {version}, newer than this "
            f"pycompress reads (up to {FORMAT_VERSION}); upgrade pycompress to load it"
        )
    if version < 1:
        raise ArtifactError(f"{path}: bad artifact format version {version}")
    raw = data[HEADER_BYTES : HEADER_BYTES + m]
    try:
        text = zlib.decompress(raw) if flags & _FLAG_ZLIB else raw
        manifest = json.loads(text.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: the manifest cannot be parsed: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: the manifest is not a JSON object")
    payload = data[HEADER_BYTES + m : HEADER_BYTES + m + p]
    facts = {
        "file_bytes": len(data),
        "manifest_bytes": m,
        "payload_bytes": p,
        "overhead_bytes": HEADER_BYTES + m + TRAILER_BYTES,
        "format_version": version,
        "sha256": digest.hex(),
    }
    return manifest, payload, facts


# ----------------------------------------------------------------------------------- bit codecs
def mask_bytes(n: int) -> int:
    """Bytes of a packed mask of n elements (whole 32-bit words)."""
    return (n + 31) // 32 * 4


def code_bytes(n: int, bits: int) -> int:
    """Bytes of n codes at ``bits`` bits (int8 / int16 for 8 / 16 bits, else packed to the bit)."""
    if bits == 8:
        return n
    if bits == 16:
        return 2 * n
    return (n * bits + 7) // 8


def pack_bool(mask: np.ndarray) -> bytes:
    """Bool array (flattened row-major) -> the packed-mask layout (whole 32-bit words)."""
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    out = np.packbits(flat, bitorder="little").tobytes()
    return out + b"\0" * (mask_bytes(flat.size) - len(out))


def unpack_bool(data: bytes, n: int) -> np.ndarray:
    """The first n bits of a packed mask as a flat bool array."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return np.unpackbits(arr, bitorder="little", count=n).astype(bool)


def _plain_dtype(bits: int, qmin: int) -> str:
    return {8: "i1", 16: "<i2"}[bits] if qmin < 0 else {8: "u1", 16: "<u2"}[bits]


def pack_codes(codes: np.ndarray, bits: int, qmin: int) -> bytes:
    """Integer codes in [qmin, qmin + 2^bits - 1] -> bytes (see the module docstring)."""
    flat = np.ascontiguousarray(codes).reshape(-1).astype(np.int64)
    qmax = qmin + (1 << bits) - 1
    if flat.size and (flat.min() < qmin or flat.max() > qmax):
        raise ValueError(f"codes outside [{qmin}, {qmax}] for {bits}-bit packing")
    if bits in (8, 16):
        return flat.astype(_plain_dtype(bits, qmin)).tobytes()
    u = (flat - qmin).astype(np.uint32)
    # element i contributes bits i*b .. i*b+b-1, least significant first
    bitplanes = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, n: int, bits: int, qmin: int) -> np.ndarray:
    """Inverse of ``pack_codes``: n codes as int32."""
    if bits in (8, 16):
        return np.frombuffer(data, dtype=_plain_dtype(bits, qmin), count=n).astype(np.int32)
    arr = np.frombuffer(data, dtype=np.uint8)
    planes = np.unpackbits(arr, bitorder="little", count=n * bits).reshape(n, bits).astype(np.int32)
    u = (planes << np.arange(bits, dtype=np.int32)).sum(axis=1, dtype=np.int64)
    return (u + qmin).astype(np.int32)
