"""Tokenizer training, loading, encode/decode, streaming: checked against transformers, tokenizers and tiktoken's
cl100k split regex (independent references), plus round-trip properties with hypothesis."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer, train_tokenizer
from tests.tokenizer_fixtures import CHINESE, ENGLISH, ROUNDTRIP_CASES, corpus, write_mistral_dir

VOCAB = 600


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train from files (a .txt, a .jsonl with 2 bad lines, a .jsonl.gz) -> (Tokenizer, out_dir)."""
    import gzip

    root = tmp_path_factory.mktemp("tok")
    docs = corpus()
    (root / "a.txt").write_text("\n".join(docs[:20]), encoding="utf-8")
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs[20:40]]
    lines[3:3] = ["{not json", json.dumps({"body": "no text field"})]
    (root / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs[40:]))
    out = root / "out"
    tok = train_tokenizer([root / "a.txt", root / "b.jsonl", root / "c.jsonl.gz"], vocab_size=VOCAB, out_dir=out)
    return tok, out


@pytest.fixture(scope="module")
def hf(trained):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trained[1])


def test_training_writes_hf_dir_and_counts_bad_records(trained):
    tok, out = trained
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert tok.vocab_size == VOCAB
    assert tok.train_stats.bad_records == 2 and tok.train_stats.files == 3
    assert tok.train_stats.documents == 1 + 20 + 20  # the .txt is one document
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg and cfg["eos_token"] == "<|endoftext|>" and cfg["pad_token"] == "<|pad|>"
    # default specials take ids 0..11 in order
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2, 3]
    assert tok.id_to_token(4) == "<|reserved_0|>"
    assert tok.special_token_ids == set(range(12))


def test_autotokenizer_gives_same_ids_and_specials(trained, hf):
    tok, _ = trained
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                   tok.pad_token_id) == (0, 0, 1)
    for text in [*ROUNDTRIP_CASES.values(), *ENGLISH, *CHINESE]:
        for add in (False, True):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("case", sorted(ROUNDTRIP_CASES))
def test_roundtrip_cases(trained, case):
    tok, _ = trained
    text = ROUNDTRIP_CASES[case]
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80))
def test_roundtrip_property(trained, text):
    tok, _ = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_trained_merges_compress_both_scripts(trained):
    tok, _ = trained
    # merges were learned within both scripts (600-token vocab on ~40 KB: English compresses far more)
    for text, ratio in ((ENGLISH[0], 2.5), (CHINESE[2], 1.3)):
        assert len(tok.encode(text)) < len(text.encode("utf-8")) / ratio


def _split_pieces(text: str) -> list[str]:
    from tokenizers import Regex, pre_tokenizers

    from lmstack.tokenizer import SPLIT_PATTERN

    return [p for p, _ in pre_tokenizers.Split(Regex(SPLIT_PATTERN), "isolated").pre_tokenize_str(text)]


CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
              r"""\s*[\r\n]|\s+(?!\S)|\s""")  # tiktoken_ext/openai_public.py cl100k_base pat_str


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("abcXYZ019 '\t\n\r.,!?()-_é") + ["don't", "  ", "12345", "I'LL"]),
                max_size=30).map("".join))
def test_split_matches_gpt4_on_latin_text(text):
    """Without CJK and combining marks, lmstack's split is GPT-4's (cl100k, via the `regex` module)."""
    import regex

    assert _split_pieces(text) == regex.findall(CL100K_PAT, text)


def test_split_separates_cjk_and_groups_digits():
    pieces = _split_pieces("GPU加速让训练快了3倍，成本 降低1234567。こんにちは世界")
    assert "GPU" in pieces and "加速让训练快了" in pieces and " 降低" in pieces
    assert ["123", "456", "7"] == [p for p in pieces if p.isdigit() and len(p) > 1 or p == "7"]
    for p in pieces:  # no piece mixes CJK with Latin letters
        has_cjk = any("\u3040" <= c <= "\u9fff" for c in p)
        has_latin = any(c.isascii() and c.isalpha() for c in p)
        assert not (has_cjk and has_latin), p


def test_sha256_and_save_roundtrip(trained, tmp_path):
    tok, out = trained
    assert tok.sha256 == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    tok.save(tmp_path / "copy")
    again = Tokenizer.from_dir(tmp_path / "copy")
    assert again.sha256 == tok.sha256
    assert again.encode(CHINESE[0]) == tok.encode(CHINESE[0])
    assert again.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_pickle_and_file_path(trained):
    import pickle

    tok, out = trained
    again = pickle.loads(pickle.dumps(tok))  # DataLoader workers under spawn pickle the tokenizer
    assert again.encode(CHINESE[1]) == tok.encode(CHINESE[1]) and again.sha256 == tok.sha256
    assert Tokenizer.from_dir(out / "tokenizer.json").sha256 == tok.sha256


def test_eos_token_ids_and_batch(trained):
    tok, _ = trained
    assert tok.eos_token_ids == [0, 3]  # <|endoftext|>, <|im_end|>
    texts = [*ENGLISH, *CHINESE, ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def _stream(tok, ids, skip=True):
    dec = tok.stream_decoder(skip_special_tokens=skip)
    deltas = [dec.step(i) for i in ids]
    deltas.append(dec.flush())
    return deltas


@pytest.mark.parametrize("text", [CHINESE[1], "emoji 😀👍🏽🇨🇳 ok", ENGLISH[1], ROUNDTRIP_CASES["mixed"]])
def test_stream_decoder_never_splits_characters(trained, text):
    tok, _ = trained
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()  # the hazard is real for this text
    deltas = _stream(tok, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_skips_specials(trained):
    import torch

    tok, _ = trained
    ids = tok.encode("<|im_start|>assistant\n你好<|im_end|>")
    assert "".join(_stream(tok, ids)) == "assistant\n你好"
    assert "".join(_stream(tok, list(torch.tensor(ids)))) == "assistant\n你好"  # tensor scalars, as a sampler gives
    assert "".join(_stream(tok, ids, skip=False)) == "<|im_start|>assistant\n你好<|im_end|>"


def test_stream_decoder_sentencepiece_spaces(tmp_path):
    """Metaspace + byte-fallback (Mistral/Llama-2 style): word spaces survive, bytes of 😀 are held back."""
    from transformers import AutoTokenizer

    d = write_mistral_dir(tmp_path / "m", corpus(30))
    tok = Tokenizer.from_dir(d)
    text = "Hello world, 你好 😀 again"
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == AutoTokenizer.from_pretrained(d).decode(ids) == text
    assert not any("\ufffd" in x for x in deltas)
    with_specials = tok.encode(text, add_special_tokens=True) + [tok.eos_token_id]  # <s> ... </s>
    assert "".join(_stream(tok, with_specials)) == tok.decode(with_specials, skip_special_tokens=True) == text


def test_stream_decoder_flushes_invalid_bytes(trained):
    tok, _ = trained
    ids = tok.encode("好")[:1]  # the first byte(s) of a 3-byte character only
    deltas = _stream(tok, ids)
    assert deltas[:-1] == [""] * len(ids) and deltas[-1] == tok.decode(ids)


# ----------------------------------------------------------------------------------------- errors


def test_from_dir_errors(tmp_path, trained):
    with pytest.raises(LmstackError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmstackError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(LmstackError, match="tokenizer.json: cannot be read"):
        Tokenizer.from_dir(bad)
    _, out = trained
    broken = tmp_path / "broken_cfg"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    (broken / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>",\n  oops}')
    with pytest.raises(LmstackError, match=r"tokenizer_config.json:2:\d+: invalid JSON"):
        Tokenizer.from_dir(broken)


def test_train_errors(tmp_path):
    with pytest.raises(LmstackError, match="at least 268"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(LmstackError, match="does not exist"):
        train_tokenizer(["data/missing.txt"], vocab_size=300)
    (tmp_path / "x.jsonl").write_text("{bad\n")
    with pytest.raises(LmstackError, match="no text to train on"):
        train_tokenizer([tmp_path / "x.jsonl"], vocab_size=300)


def test_train_from_strings_and_custom_specials(tmp_path):
    tok = train_tokenizer(iter(corpus(10)), vocab_size=400, special_tokens=["<s>", "</s>"], out_dir=tmp_path / "t")
    assert tok.token_to_id("<s>") == 0 and tok.special_token_ids == {0, 1}
    assert tok.bos_token_id is None and tok.eos_token_id is None  # custom specials: not named
    assert tok.decode(tok.encode("x<s>y")) == "x<s>y"


def test_cli_train_and_errors(tmp_path, capsys):
    from lmstack.cli import main

    (tmp_path / "in.txt").write_text("\n".join(corpus(10)), encoding="utf-8")
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "in.txt"), "--vocab-size", "400",
               "--out", str(tmp_path / "o")])
    assert rc == 0 and Tokenizer.from_dir(tmp_path / "o").vocab_size == 400
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "400",
               "--out", str(tmp_path / "o2")])
    assert rc == 2 and "missing.txt does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o2")


def test_reads_all_formats_from_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = corpus(12)
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(docs[0] + "\r\n" + docs[1], encoding="utf-8")  # one document, \r\n kept
    jl = "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs[2:6]) + "\n{broken\n"
    (d / "sub" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jl.encode("utf-8")))
    pq.write_table(pa.table({"text": docs[6:12], "id": list(range(6))}), d / "c.parquet")
    (d / "weights.bin").write_bytes(bytes(range(256)) * 10)  # not text: skipped in a directory
    tok = train_tokenizer([d], vocab_size=300, show_progress=False)
    st = tok.train_stats
    assert (st.files, st.documents, st.bad_records) == (3, 1 + 4 + 6, 1)
    assert st.chars == len(docs[0] + "\r\n" + docs[1]) + sum(len(t) for t in docs[2:12])
    with pytest.raises(LmstackError, match="no column 'body'"):
        train_tokenizer([d / "c.parquet"], vocab_size=300, text_field="body")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(list("ab 好😀\n") + ["👍🏽", "中文", "<|im_end|>", "<|endoftext|>", "  "]),
                max_size=20).map("".join))
def test_stream_decoder_property(trained, text):
    """Deltas add up to the full decode, and never contain a replacement character."""
    tok, _ = trained
    ids = tok.encode(text)
    for skip in (True, False):
        deltas = _stream(tok, ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)


def test_sample_rate_and_max_chars(tmp_path):
    docs = corpus(40)
    full = train_tokenizer(docs, vocab_size=300, show_progress=False)
    capped = train_tokenizer(docs, vocab_size=300, max_chars=1000, show_progress=False)
    assert full.train_stats.trained_chars == sum(map(len, docs))
    assert capped.train_stats.trained_chars == 1000
    half = train_tokenizer(docs, vocab_size=300, sample_rate=0.5, seed=1, show_progress=False)
    assert 0 < half.train_stats.trained_chars < full.train_stats.trained_chars
    again = train_tokenizer(docs, vocab_size=300, sample_rate=0.5, seed=1, show_progress=False)
    assert again.sha256 == half.sha256  # seeded
    with pytest.raises(LmstackError, match="sample_rate"):
        train_tokenizer(docs, vocab_size=300, sample_rate=0.0)


def test_stats_against_transformers_counts(trained, tmp_path):
    from transformers import AutoTokenizer

    from lmstack.tokenizer.stats import tokenizer_stats

    tok, out = trained
    docs = [*ENGLISH, *CHINESE, ROUNDTRIP_CASES["emoji"]]
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\nbad\n")
    (row,) = tokenizer_stats([tok], [tmp_path / "e.jsonl"], show_progress=False)
    hf = AutoTokenizer.from_pretrained(out)
    n_tokens = sum(len(hf.encode(t, add_special_tokens=False)) for t in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    assert (row["documents"], row["tokens"], row["bytes"], row["bad_records"]) == (len(docs), n_tokens, n_bytes, 1)
    assert row["bytes_per_token"] == pytest.approx(n_bytes / n_tokens)


def test_config_token_missing_from_vocab_is_reported(trained, tmp_path, caplog):
    _, out = trained
    d = tmp_path / "mismatch"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>", "pad_token": "<|pad|>"}))
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_id is None and tok.pad_token_id == 1
    assert "eos_token '<|eot_id|>'" in caplog.text


def test_cli_encode_decode_chat_stats(trained, tmp_path, capsys):
    from lmstack.cli import main

    tok, out = trained
    text = "GPU加速 ok"
    assert main(["tokenizer", "encode", str(out), text]) == 0
    ids = [int(x) for x in capsys.readouterr().out.splitlines()[0].split()]
    assert ids == tok.encode(text)
    assert main(["tokenizer", "decode", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out.rstrip("\n") == text
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    assert main(["tokenizer", "chat", str(out), str(conv)]) == 0
    shown = capsys.readouterr().out
    assert "<|im_start|>assistant\n[[yo<|im_end|>]]\n" in shown
    (tmp_path / "t.txt").write_text(ENGLISH[0], encoding="utf-8")
    assert main(["tokenizer", "stats", str(out), "--input", str(tmp_path / "t.txt")]) == 0
    assert f"{len(ENGLISH[0].encode()) / len(tok.encode(ENGLISH[0])):.3f}" in capsys.readouterr().out
    assert main(["tokenizer", "chat", str(out), str(tmp_path / "missing.json")]) == 2


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["<|im_end|>", "<|pad|>", " ", "\n", "x", "中", "😀", "123", "\x00", "'s"])
                | st.text(st.characters(exclude_categories=("Cs",)), max_size=10), max_size=12).map("".join))
def test_ids_match_autotokenizer_property(trained, hf, text):
    tok, _ = trained
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_with_added_tokens_matches_transformers(trained, tmp_path):
    from transformers import AutoTokenizer

    tok, out = trained
    new = tok.with_added_tokens(["<|tool|>", "<|im_end|>", "<|think|>"])  # <|im_end|> exists: kept
    ref = AutoTokenizer.from_pretrained(out)
    ref.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|think|>"]})
    assert new.vocab_size == len(ref) == tok.vocab_size + 2
    text = "a<|tool|>b<|think|>c<|im_end|>"
    assert new.encode(text) == ref.encode(text, add_special_tokens=False)
    assert new.token_to_id("<|im_end|>") == tok.token_to_id("<|im_end|>")
    assert new.decode(new.encode(text), skip_special_tokens=True) == "abc"
    new.save(tmp_path / "t")
    assert AutoTokenizer.from_pretrained(tmp_path / "t").encode(text, add_special_tokens=False) == new.encode(text)
    assert tok.sha256 != new.sha256 and Tokenizer.from_dir(tmp_path / "t").sha256 == new.sha256


def test_json_array_and_truncated_archives_are_counted(tmp_path):
    import gzip

    import zstandard

    docs = corpus(6)
    (tmp_path / "a.json").write_text(json.dumps([{"text": docs[0]}, docs[1], {"x": 1}, 5]), encoding="utf-8")
    whole = gzip.compress("\n".join(json.dumps({"text": t}) for t in docs[2:]).encode())
    (tmp_path / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # truncated download
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[0].encode())[:-6])
    (tmp_path / "d.txt").write_text(docs[5], encoding="utf-8")
    tok = train_tokenizer([tmp_path], vocab_size=300, show_progress=False)
    st = tok.train_stats
    assert st.files == 4
    assert st.bad_records == 2 + 1 + 1  # two bad array items, two unreadable archives
    assert any("b.jsonl.gz" in f and "corrupt_file" in r for f, _, r in st.malformed)  # the data readers' word
    assert any("c.txt.zst" in f and "corrupt_file" in r for f, _, r in st.malformed)
