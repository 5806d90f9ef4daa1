"""Careless-user inputs to the data path: binary files, huge records, unreadable directories, temp files left by
a SIGKILL, a shard index read from another directory, SFT turns without content. Each is counted and reported
(or refused with one line), never silently kept or silently dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from lmstack.data.pipeline import run_pipeline
from lmstack.data.readers import ReadStats, iter_file, looks_binary
from lmstack.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
GOOD = ("The river runs past the old mill, where the miller keeps his accounts in a small book. "
        "Every morning he walks to the market and buys bread, cheese and apples for the family.")


def _cfg(inputs, **kw):
    cfg = {"inputs": [{"path": str(p)} for p in inputs], "workers": 1, "quality": {"enabled": False},
           "language": {"enabled": False}, "pii": {"enabled": False}, "dedup": {"exact": True, "near": False}}
    cfg.update(kw)
    return cfg


def _out_texts(out: Path) -> list[str]:
    return [json.loads(x)["text"] for x in (out / "data.jsonl").read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- binary content
def test_binary_file_named_txt_is_not_a_document(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_text(GOOD, encoding="utf-8")
    blob = bytes(range(256)) * 40  # NULs and control bytes, as an executable or image
    (src / "photo.txt").write_bytes(blob)
    assert blob.decode("utf-8", errors="replace").strip()  # decoded leniently it would be a "document"
    report = run_pipeline(_cfg([src]), tmp_path / "out")  # quality filter off: the reader alone must catch it
    assert _out_texts(tmp_path / "out") == [GOOD]
    assert report["read"]["problems"].get("binary_file") == 1
    assert any("photo.txt" in e and "binary_file" in e for e in report["read"]["examples"])


def test_binary_detection_keeps_real_text():
    assert not looks_binary(GOOD.encode())
    assert not looks_binary("第一篇文档，包含中文标点。\n\tTabs and\r\nCRLF, \x1b[1mANSI\x1b[0m".encode())
    assert looks_binary(b"PK\x03\x04\x14\x00\x00\x00")  # a zip header
    assert looks_binary(bytes([1, 2, 3, 4, 5, 6, 7, 8]) * 20 + b"abc")  # control bytes, no NUL


# --------------------------------------------------------------------------- record size
def test_oversized_line_is_skipped_without_being_held_in_memory(tmp_path):
    big = 24 << 20  # a 24 MiB line between two normal ones
    p = tmp_path / "x.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "first"}) + "\n")
        f.write('{"text": "' + "a" * big + '"}\n')
        f.write(json.dumps({"text": "third"}) + "\n")
    st = ReadStats()
    tracemalloc.start()
    try:
        recs = list(iter_file(p, p.name, "src", "text", st, max_record_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.text for r in recs] == ["first", "third"] and [r.line for r in recs] == [1, 3]
    assert st.problems["record_too_large"] == 1 and f"{p}:2: record_too_large" in st.examples[0]
    assert peak < 8 << 20  # the 24 MiB line was never read whole


def test_oversized_whole_file_document_and_csv_field(tmp_path):
    (tmp_path / "big.md").write_text("word " * 300_000, encoding="utf-8")  # 1.5 MB document
    st = ReadStats()
    assert list(iter_file(tmp_path / "big.md", "big.md", "s", "text", st, max_record_bytes=1 << 20)) == []
    assert st.problems == {"record_too_large": 1}
    (tmp_path / "t.csv").write_text("text\nshort\n\"" + "b" * (2 << 20) + "\"\n", encoding="utf-8")
    st = ReadStats()
    recs = list(iter_file(tmp_path / "t.csv", "t.csv", "s", "text", st, max_record_bytes=1 << 20))
    assert [r.text for r in recs] == ["short"] and st.problems["record_too_large"] == 1


def test_pipeline_config_caps_records(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in (GOOD, "z" * 5000)) + "\n", encoding="utf-8")
    report = run_pipeline(_cfg([p], max_record_bytes=4096), tmp_path / "out")
    assert _out_texts(tmp_path / "out") == [GOOD] and report["read"]["problems"] == {"record_too_large": 1}


# --------------------------------------------------------------------------- unreadable paths
@pytest.fixture
def unlistable(monkeypatch):
    """Make chosen directories fail to list with EACCES (as chmod 000 does for a non-root user; the tests may
    run as root, which chmod cannot stop)."""
    blocked: set[str] = set()
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.path.abspath(os.fspath(path)) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return blocked


def test_unreadable_subdirectory_is_counted_and_reported(tmp_path, unlistable):
    src = tmp_path / "in"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "secret.txt").write_text("hidden text that is never read", encoding="utf-8")
    (src / "a.txt").write_text(GOOD, encoding="utf-8")
    unlistable.add(str(src / "locked"))
    report = run_pipeline(_cfg([src]), tmp_path / "out")
    assert _out_texts(tmp_path / "out") == [GOOD]
    assert report["read"]["problems"] == {"unreadable_path": 1}
    assert any(str(src / "locked") in e for e in report["read"]["examples"])
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "unreadable_path" in html

    with pytest.raises(DataError, match=r"locked: cannot read it .*--strict") as e:
        run_pipeline(_cfg([src], strict=True), tmp_path / "out2")
    assert "\n" not in str(e.value)


def test_unreadable_input_directory_says_so(tmp_path, unlistable):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text(GOOD, encoding="utf-8")
    unlistable.add(str(src))
    with pytest.raises(DataError, match=r"directory .*in cannot be read"):
        run_pipeline(_cfg([src]), tmp_path / "out")


def test_cli_strict_flag_and_problem_line(tmp_path, unlistable, capsys):
    from lmstack.cli import main

    src = tmp_path / "in"
    (src / "locked").mkdir(parents=True)
    (src / "a.txt").write_text(GOOD, encoding="utf-8")
    unlistable.add(str(src / "locked"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg([src])), encoding="utf-8")  # JSON is YAML
    assert main(["data", "run", "-c", str(cfg), "-o", str(tmp_path / "o")]) == 0
    assert "input problems (skipped; details in report.html): unreadable_path=1" in capsys.readouterr().err
    assert main(["data", "run", "-c", str(cfg), "-o", str(tmp_path / "o2"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "locked: cannot read it" in err[0]


# --------------------------------------------------------------------------- temp files left by SIGKILL
_KILL_MID_MERGE = r"""
import contextlib, os, signal, sys
import lmstack.data.pipeline as P
real = P.atomic_write
@contextlib.contextmanager
def dying(path, *a, **k):
    with real(path, *a, **k) as f:
        if str(path).endswith("data.jsonl"):
            f.write("partial")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 during the merge
        yield f
P.atomic_write = dying
P.run_pipeline(sys.argv[1], sys.argv[2])
"""


def test_sigkill_during_merge_leaves_temps_that_the_rerun_removes(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"{GOOD} {i}"}) for i in range(5)) + "\n", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg([src])), encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMSTACK_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-c", _KILL_MID_MERGE, str(cfg), str(out)], env=env, capture_output=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    left = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    assert left and all(n.startswith(".data.jsonl.") for n in left)  # what the issue saw
    (out / ".report.json.abc12345.tmp").write_text("x")  # an older lmstack's temp name (no pid)
    live = out / f".report.json.{os.getppid()}.zzzzzzzz.tmp"  # another live process's write: not ours to remove
    live.write_text("x")

    run_pipeline(str(cfg), out)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == [live.name]
    assert len(_out_texts(out)) == 5


def test_remove_stale_temps_keeps_unrelated_files(tmp_path):
    from lmstack.utils.io import atomic_write, remove_stale_temps

    keep = [".hidden", ".config.tmp", "data.jsonl", ".x.tmp-notapid"]
    for n in keep:
        (tmp_path / n).write_text("x")
    dead = tmp_path / ".data.jsonl.4194999.k2j3h4g5.tmp"
    dead.write_text("x")
    stale_dir = tmp_path / ".shard-00000-of-00001.tmp-4194999"
    stale_dir.mkdir()
    with atomic_write(tmp_path / "out.txt") as f:  # our own write in progress is never removed
        f.write("y")
        removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, stale_dir.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["out.txt"])


# --------------------------------------------------------------------------- shard index -> tokenizer
def test_shard_index_finds_its_tokenizer_from_any_directory(tmp_path, monkeypatch):
    from lmstack.data.shards import write_shards
    from lmstack.tokenizer import train_tokenizer
    from lmstack.train.pretraining import _tokenizer_dir

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    tok = train_tokenizer([GOOD] * 20, vocab_size=300, out_dir="tok", show_progress=False)
    write_shards([GOOD] * 4, tok, "shards", val_fraction=0.0, tokenizer_dir="tok")  # relative to this cwd
    index = json.loads((work / "shards" / "index.json").read_text())
    assert not Path(index["tokenizer_dir"]).is_absolute()
    assert (work / "shards" / index["tokenizer_dir"]).resolve() == (work / "tok").resolve()

    monkeypatch.chdir(tmp_path)  # pretrain from elsewhere: the tokenizer is still found
    assert _tokenizer_dir(index, work / "shards").resolve() == (work / "tok").resolve()


def test_pretrain_refuses_shards_whose_tokenizer_is_gone(tmp_path):
    import shutil

    from lmstack.train import pretrain
    from lmstack.train.config import PretrainConfig
    from tests.train_fixtures import TINY_MODEL, write_shards

    shards = write_shards(tmp_path / "s")
    shutil.rmtree(shards / "tokenizer")
    cfg = PretrainConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "overrides": TINY_MODEL},
        "data": {"shards": str(shards), "seq_len": 16, "batch_size": 2},
        "train": {"steps": 2, "warmup_steps": 0, "device": "cpu", "tensorboard": False, "plot": False}})
    with pytest.raises(DataError, match="tokenizer the shards were made with .* is not found"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- SFT records
def test_sft_turn_without_content_is_rejected_with_its_line(tmp_path):
    from lmstack.tune.data import BadRecord, DataReport, read_records, to_messages

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}]}]
    p = tmp_path / "sft.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    report, bad = DataReport(str(p)), []
    for ln, rec in read_records(p, report):
        try:
            to_messages(rec)
        except BadRecord as e:
            bad.append((ln, str(e)))
    assert bad == [(2, 'messages[0] (user) has no "content"'), (3, 'messages[0] (user) has no "content"')]


def test_tokenizer_training_skips_binary_files(tmp_path):
    from lmstack.tokenizer import train_tokenizer

    (tmp_path / "good.txt").write_text(GOOD * 20, encoding="utf-8")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 64)
    tok = train_tokenizer([tmp_path / "good.txt", tmp_path / "blob.txt"], vocab_size=300, show_progress=False)
    st = tok.train_stats
    assert st.bad_records == 1 and st.malformed[0][0].endswith("blob.txt") and "binary" in st.malformed[0][2]
    assert st.documents == 1
