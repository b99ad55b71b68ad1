"""Reading text inputs: JSONL (`score`, `generate`, `eval`) and whole .txt documents (`score`, `eval
--perplexity`, `data preprocess`, `data train-tokenizer`): one place for the file and line checks, and
for the UTF-8 byte order mark some editors write first (never part of the text)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, written first by some editors ("UTF-8 with BOM")


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
    """(line number, parsed value) for every non-blank line (a UTF-8 BOM opening the file is skipped).
    A missing file, a line that is not
    UTF-8 or not JSON raise UserError naming the file and line; callers check the value's shape."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: input file not found")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
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
