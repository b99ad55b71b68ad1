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


def test_jsonl_zst_is_read_like_the_plain_file(tmp_path):
    """A Pile-style .jsonl.zst (written here by the zstandard package, two frames, the first line opening with
    a BOM) gives the lines of the plain file; score, generate and eval read it (it was 'not UTF-8')."""
    import zstandard

    plain = b'\xef\xbb\xbf{"text": "first"}\n\n{"tokens": [1, 2]}\n' + b"".join(
        b'{"text": "line %d \xc3\xa9"}\n' % i for i in range(300)) + b'{"last": 1}'  # no final newline
    (tmp_path / "in.jsonl").write_bytes(plain)
    z = zstandard.ZstdCompressor()
    (tmp_path / "in.jsonl.zst").write_bytes(z.compress(plain[:1000]) + z.compress(plain[1000:]))
    got = list(read_jsonl(tmp_path / "in.jsonl.zst"))
    assert got == list(read_jsonl(tmp_path / "in.jsonl")) and got[0] == (1, {"text": "first"})
    assert len(got) == 303 and got[-1] == (304, {"last": 1})  # line 2 is blank
    blob = z.compress(plain)
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match=r"cut\.jsonl\.zst: offset \d+ \(uncompressed \d+\): truncated zstd"):
        list(read_jsonl(tmp_path / "cut.jsonl.zst"))


def test_score_reads_a_jsonl_zst(tmp_path, capsys):
    """End to end: score's summary of a .jsonl.zst is that of the same plain JSONL."""
    import json

    import zstandard

    from neox_jax.cli import main

    ck = tmp_path / "ck"
    assert main(["-q", "init", "tiny", str(ck), "--set", "model.num_layers=1", "--set", "model.vocab_size=512",
                 "--set", "model.tokenizer_vocab_size=0"]) == 0
    text = "".join(json.dumps({"tokens": list(range(i, i + 9))}) + "\n" for i in range(3)).encode()
    (tmp_path / "in.jsonl").write_bytes(text)
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    summaries = []
    for name in ("in.jsonl", "in.jsonl.zst"):
        capsys.readouterr()
        assert main(["-q", "score", str(ck), "--input", str(tmp_path / name)]) == 0
        summaries.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"])
    assert summaries[0] == summaries[1] and summaries[0]["tokens_scored"] == 24
