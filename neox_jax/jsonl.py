"""Reading JSONL inputs (`score`, `generate`, `eval`): one place for the file and line checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, written first by some editors ("UTF-8 with BOM")


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
