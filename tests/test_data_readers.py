"""Readers: every format and compression, directories and globs, and bad input counted with file and line."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from lmstack.data.readers import ReadStats, expand_inputs, iter_file
from lmstack.errors import DataError


def _read(path: Path, **kw):
    st = ReadStats()
    recs = list(iter_file(path, path.name, "src", kw.pop("text_field", "text"), st, **kw))
    return recs, st


def test_formats_and_compression(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{"text": "第一篇 文档", "id": 1}, {"text": "second doc", "id": 2}]
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (tmp_path / "d.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    with open(tmp_path / "e.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "f.parquet")
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.json", "e.csv", "f.parquet"):
        recs, st = _read(tmp_path / name, keep_fields=("id",))
        assert [r.text for r in recs] == ["第一篇 文档", "second doc"], name
        assert [str(r.meta["id"]) for r in recs] == ["1", "2"], name
        assert st.problems == {} and st.records == 2
    assert [r.line for r in _read(tmp_path / "a.jsonl")[0]] == [1, 2]
    assert _read(tmp_path / "a.jsonl")[0][1].id == "src/a.jsonl:2"


def test_txt_md_html_modes(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nstill one\n\npara two\n", encoding="utf-8")
    assert [r.text for r in _read(tmp_path / "a.txt")[0]] == ["para one\nstill one\n\npara two\n"]
    assert [(r.text, r.line) for r in _read(tmp_path / "a.txt", txt_mode="paragraph")[0]] == [
        ("para one\nstill one", 1), ("para two", 4)]
    assert len(_read(tmp_path / "a.txt", txt_mode="line")[0]) == 3
    (tmp_path / "b.md").write_text("# Title\n\ntext", encoding="utf-8")
    assert _read(tmp_path / "b.md")[0][0].text.startswith("# Title")
    (tmp_path / "c.html").write_text("<html><body><p>hi</p></body></html>", encoding="utf-8")
    recs, _ = _read(tmp_path / "c.html")
    assert recs[0].html is True


def test_bad_input_counted_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok one"}\n{not json\n{"body": "no text field"}\n{"text": 5}\n'
                  b'{"text": "bad \xff\xfe bytes"}\n[1, 2]\n{"text": "   "}\n{"text": "ok two"}\n')
    recs, st = _read(p)
    assert [r.text for r in recs] == ["ok one", "bad \ufffd\ufffd bytes", "ok two"]
    assert st.problems == {"malformed_json": 1, "missing_field": 1, "non_string_field": 1, "undecodable_bytes": 1,
                           "not_an_object": 1, "empty_text": 1}
    joined = "\n".join(st.examples)
    for line, kind in ((2, "malformed_json"), (3, "missing_field"), (4, "non_string_field"), (5, "undecodable_bytes")):
        assert f"{p}:{line}: {kind}" in joined
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    recs, st = _read(tmp_path / "empty.jsonl")
    assert recs == [] and st.problems == {"empty_file": 1}
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    recs, st = _read(tmp_path / "trunc.jsonl.gz")
    assert st.problems.get("corrupt_file") == 1
    with open(tmp_path / "x.csv", "w", encoding="utf-8") as f:
        f.write("a,b\n1,2\n")
    assert _read(tmp_path / "x.csv")[1].problems == {"missing_field": 1}


def test_expand_dirs_globs_and_missing(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for n in ("d/a.jsonl", "d/sub/b.txt", "d/sub/c.jsonl.gz", "d/skip.bin"):
        (tmp_path / n).write_text("x", encoding="utf-8")
    got = [rel for _, rel in expand_inputs(tmp_path / "d")]
    assert got == ["a.jsonl", "sub/b.txt", "sub/c.jsonl.gz"]
    got = [rel for _, rel in expand_inputs(str(tmp_path / "d" / "**" / "*.jsonl*"))]
    assert got == ["a.jsonl", "sub/c.jsonl.gz"]
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs(str(tmp_path / "*.parquet"))


def test_truncated_zstd_is_counted_not_silently_short(tmp_path):
    """A .zst cut short used to end quietly (zstandard's stream_reader); now it is a corrupt_file with what was
    readable before the cut kept -- the same reader tokenizer training uses."""
    import zstandard

    lines = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(200)).encode()
    whole = zstandard.ZstdCompressor().compress(lines)
    (tmp_path / "ok.jsonl.zst").write_bytes(whole)
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) - 40])
    st = ReadStats()
    assert len(list(iter_file(tmp_path / "ok.jsonl.zst", "ok", "s", "text", st))) == 200 and not st.problems
    got = list(iter_file(tmp_path / "cut.jsonl.zst", "cut", "s", "text", st))
    assert len(got) < 200 and st.problems["corrupt_file"] == 1
    assert any("cut.jsonl.zst" in e and "EOFError" in e for e in st.examples)


def test_chunks_mode_reads_a_text_document_of_any_size_in_pieces(tmp_path):
    text = "".join(f"line {i}: " + "x" * 100 + "\n" for i in range(25_000))  # ~2.7 MB, over one chunk
    (tmp_path / "big.py").write_text(text)
    st = ReadStats()
    pieces = list(iter_file(tmp_path / "big.py", "big.py", "s", "text", st, txt_mode="chunks",
                            text_ext=frozenset({".py"})))
    assert len(pieces) == 3 and "".join(p.text for p in pieces) == text and st.records == 1
    assert all(p.text.endswith("\n") for p in pieces)  # cut at line ends
    assert list(iter_file(tmp_path / "big.py", "big.py", "s", "text", ReadStats())) == []  # .py is not data text
