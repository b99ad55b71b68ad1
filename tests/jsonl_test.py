"""The shared JSONL reader behind score, generate and eval: file and line named on bad input."""

import pytest

from neox_jax.errors import UserError
from neox_jax.jsonl import read_jsonl


def test_lines_blank_lines_and_errors(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"a": 1}\n\n  \n[2, 3]\n"\xc3\xa9"\n')
    assert list(read_jsonl(p)) == [(1, {"a": 1}), (4, [2, 3]), (5, "\u00e9")]
    p.write_bytes(b'{"a": 1}\n{"b": \xff}\n')
    with pytest.raises(UserError, match=r"in\.jsonl:2: not UTF-8 \(byte 6"):
        list(read_jsonl(p))
    p.write_bytes(b'{"a": 1}\n{"b": }\n')
    with pytest.raises(UserError, match=r"in\.jsonl:2: not valid JSON"):
        list(read_jsonl(p))
    with pytest.raises(UserError, match="nope.jsonl: input file not found"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_utf8_bom_at_the_start_is_not_part_of_the_first_line(tmp_path):
    """Editors on Windows save "UTF-8 with BOM": the file's first line was 'not valid JSON'."""
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\xef\xbb\xbf{"b": 2}\n')
    assert next(read_jsonl(p)) == (1, {"a": 1})
    with pytest.raises(UserError, match=r"in\.jsonl:2: not valid JSON"):  # only the file's first bytes
        list(read_jsonl(p))
