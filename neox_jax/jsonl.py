"""Reading text inputs: JSONL, plain or zstd-compressed (`.jsonl.zst`, the Pile's form; `score`,
`generate`, `eval`, and `data preprocess`/`train-tokenizer` through `zst_lines`) and whole .txt
documents (`score`, `eval --perplexity`, `data preprocess`, `data train-tokenizer`): one place for the
file and line checks, and for the UTF-8 byte order mark some editors write first (never text), and
`check_utf8`, the one check that text can be tokenised: JSON's `\\ud800` escapes and the undecodable
bytes of a command-line argument or a line of standard input (Python's PEP 383 escapes) reach Python
as lone surrogates, which no tokenizer takes and no UTF-8 file can hold."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, written first by some editors ("UTF-8 with BOM")
SURROGATE = "holds an unpaired surrogate escape (not encodable as UTF-8)"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a line without one cannot decode to a surrogate


def check_utf8(text: str, where: str, what: str = "text", from_bytes: bool = False) -> str:
    """`text`, when it is encodable as UTF-8; else UserError `{where}: {what} holds an unpaired surrogate
    escape ...`.  `from_bytes=True` (a command-line argument, a line of standard input): the surrogates
    are bytes that were not UTF-8 (PEP 383), and the error says so, naming the first one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        if from_bytes and 0xDC80 <= bad <= 0xDCFF:  # PEP 383: byte b arrives as U+DC00 + b
            offset = len(text[: e.start].encode("utf-8"))
            raise UserError(f"{where}: not UTF-8 (byte {bad - 0xDC00:#04x} at offset {offset})") from None
        raise UserError(f"{where}: {what} {SURROGATE}") from None
    return text


def _check_strings(value: Any, where: str, what: str = "a string") -> None:
    """check_utf8 on every string (key or value) of a parsed JSON value, naming the key that holds it."""
    if isinstance(value, str):
        check_utf8(value, where, what)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_utf8(k, where, "a key")
            _check_strings(v, where, repr(k))
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, where, what)


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
    offset), as does a string with an unpaired surrogate escape (`"\\ud800"`: valid JSON, but no text);
    callers check the value's shape."""
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
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if _SURROGATE_ESCAPE.search(line):
                _check_strings(value, f"{p}:{lineno}")
            yield lineno, value
