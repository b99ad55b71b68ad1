"""Reading text inputs: JSONL, plain or zstd-compressed (`.jsonl.zst`, the Pile's form; `score`,
`generate`, `eval`, and `data preprocess`/`train-tokenizer` through `zst_lines`) and whole .txt
documents (`score`, `eval --perplexity`, `data preprocess`, `data train-tokenizer`): one place for the
file and line checks, and for the UTF-8 byte order mark some editors write first (never text)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, written first by some editors ("UTF-8 with BOM")


def zst_lines(path: Path, raw, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a .zst file (one or more frames), decompressed as they stream.  A corrupt or
    truncated stream raises UserError naming the file and the compressed/uncompressed offsets."""
    import zstandard

    dobj = zstandard.ZstdDecompressor().decompressobj()
    pending = b""
    out_pos = 0  # uncompressed bytes produced so far
    frame_open = False
    while True:
        data = raw.read(chunk)
        if not data:
            break
        while data:
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as e:
                raise UserError(f"{path}: offset {raw.tell()} (uncompressed {out_pos}): corrupt zstd stream "
                                f"({e})") from None
            frame_open = True
            data = b""
            if dobj.eof:  # a frame ended; anything after it starts the next one
                data = dobj.unused_data
                dobj = zstandard.ZstdDecompressor().decompressobj()
                frame_open = bool(data)
            out_pos += len(out)
            pending += out
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
    if frame_open:
        raise UserError(f"{path}: offset {raw.tell()} (uncompressed {out_pos}): truncated zstd stream "
                        "(the last frame never ends)")
    if pending:
        yield pending


def read_text(path: str | os.PathLike) -> str:
    """A .txt file's text: UTF-8, a BOM opening it skipped.  Bytes that are not UTF-8 raise UserError
    naming the file and the offset (in the file) of the first bad byte."""
    p = Path(path)
    data = p.read_bytes()
    skip = len(BOM) if data.startswith(BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: offset {e.start + skip}: not UTF-8 ({e.reason})") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line (a UTF-8 BOM opening the file is skipped); a
    file whose name ends in `.zst` is decompressed as it streams.  A missing file, a line that is not
    UTF-8 or not JSON, a corrupt or truncated zstd stream raise UserError naming the file and line (or
    offset); callers check the value's shape."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: input file not found")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(zst_lines(p, f) if p.name.endswith(".zst") else f, 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{p}:{lineno}: not UTF-8 (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
