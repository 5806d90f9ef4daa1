"""``lmstack serve --rag``: a live server on 127.0.0.1 answers through the ``openai`` client with the retrieved
sources in the response (JSON and streamed), reports its index at /v1/rag, and takes uploads into the index only
with the API key."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.rag_fixtures import EN_FACT, write_corpus
from tests.serve_fixtures import LiveServer, tiny_model_dir

pytest.importorskip("pypdf")
openai = pytest.importorskip("openai")

KEY = "sk-rag-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lmstack.rag.index import index_documents
    from lmstack.rag.server import rag_wrap
    from lmstack.serve.api.app import create_app
    from lmstack.serve.llm import load

    root = tmp_path_factory.mktemp("rag")
    write_corpus(root / "docs")
    index_documents([root / "docs"], root / "docs.sqlite", embedder=None, chunk_tokens=48, overlap=8)
    # the tiny byte-level tokenizer spends ~3 tokens a Chinese character: room for three sources
    llm = load(tiny_model_dir(root / "tiny", max_position_embeddings=2048), max_num_seqs=4, max_model_len=2048)
    wrap = rag_wrap(root / "docs.sqlite", k=3, upload=True, embedder=None, api_key=KEY)
    app = wrap(create_app(llm, api_key=KEY, served_model_name="tiny"), llm)
    with LiveServer(app) as s:
        s.root = root
        yield s


def _client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)


def test_chat_answers_with_sources_through_the_openai_client(server):
    resp = _client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "How many simultaneous clients does the X200 support?"}],
        max_tokens=8, temperature=0)
    srcs = resp.model_extra["sources"]
    assert [s["n"] for s in srcs] == [1, 2, 3]
    assert srcs[0]["source"] == "guide.en.md" and EN_FACT in srcs[0]["text"] and srcs[0]["headings"] == "Limits"
    assert all(isinstance(s["cited"], bool) for s in srcs)
    assert resp.choices[0].message.content is not None


def test_streamed_answer_carries_sources_before_done(server):
    stream = _client(server).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "怎么恢复出厂设置？"}], max_tokens=6, stream=True)
    chunks = list(stream)
    with_sources = [c for c in chunks if (c.model_extra or {}).get("sources")]
    assert len(with_sources) == 1 and with_sources[0] is chunks[-1] and not with_sources[0].choices
    assert with_sources[0].model_extra["sources"][0]["source"] == "manual.zh.pdf"
    assert with_sources[0].model_extra["sources"][0]["page"] == 2


def test_the_grounded_prompt_numbers_the_sources(server):
    """What the model read: /v1/chat/completions with echo of the prompt is not OpenAI's, so check the middleware's
    grounding directly against the same retriever the server uses."""
    from lmstack.rag.server import RagMiddleware

    mw = RagMiddleware(None, server.app.retriever, k=2)
    body, hits = mw._ground(json.dumps({"model": "tiny", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hotline number"}]}).encode())
    system = json.loads(body)["messages"][0]["content"]
    assert system.startswith("Be brief.\n\nSources:\n[1] (")
    assert f"[1] ({hits[0].chunk.source}" in system and "555-0100" in hits[0].chunk.text
    assert mw._ground(b'{"messages": [{"role": "user", "content": "x"}], "rag": false}')[1] is None


def test_rag_info_and_upload_need_the_key(server, tmp_path):
    r = httpx.get(server.url + "/v1/rag", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["documents"] == 12 and r.json()["upload"] is True
    assert httpx.get(server.url + "/v1/rag").status_code == 401
    doc = "# Fan\n\nThe Z9 fan has three speeds and a quiet night mode.\n".encode()
    r = httpx.post(server.url + "/v1/rag/documents?name=../../fan.md", content=doc)
    assert r.status_code == 401  # no key: refused before the body is read
    r = httpx.post(server.url + "/v1/rag/documents?name=evil.exe", content=doc,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "file name ending in" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/rag/documents?name=../../fan.md", content=doc,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["added"] == ["uploads/fan.md"] and r.json()["documents"] == 13
    assert (server.root / "docs.uploads" / "fan.md").is_file()  # inside the upload folder, whatever the name said
    resp = _client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "How many speeds does the Z9 fan have?"}], max_tokens=4)
    assert resp.model_extra["sources"][0]["source"] == "uploads/fan.md"
    r = httpx.post(server.url + "/v1/rag/documents?name=bad.pdf", content=b"%PDF-1.4 junk",
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 422 and "not a readable PDF" in r.json()["failed"][0]["reason"]


# ---- the web chat against the RAG server, in headless Chromium (Debian's chromium, as tests/test_webchat.py) ----

@pytest.fixture(scope="module")
def browser():
    import os

    from tests.test_webchat import ARGS, CHROMIUM

    if not os.path.exists(CHROMIUM):
        pytest.skip("install the system package: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _page(browser, server, width, height):
    ctx = browser.new_context(viewport={"width": width, "height": height})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(server.url + "/")
    pg.fill("#api_key", KEY)
    pg.dispatch_event("#api_key", "change")
    pg.fill("#max_tokens", "8")
    return ctx, pg


@pytest.mark.parametrize("size", [(1200, 800), (390, 844)], ids=["desktop", "phone"])
def test_web_chat_shows_source_cards_copy_regenerate_and_fits_a_phone(browser, server, size, tmp_path):
    ctx, pg = _page(browser, server, *size)
    try:
        pg.wait_for_selector("#rag-bar:not([hidden])")
        assert "12 documents" in pg.inner_text("#rag-info") or "13 documents" in pg.inner_text("#rag-info")
        assert pg.locator("#upload-label").is_visible()
        if size[0] < 500:  # settings open (the key asked for it): the chat keeps the screen's width behind it
            assert pg.locator("#settings").is_visible()
            assert pg.locator("#chat").bounding_box()["width"] >= 370
            assert pg.locator("#input").bounding_box()["width"] >= 250
            pg.click("#toggle-settings")
            assert not pg.locator("#settings").is_visible()
        pg.fill("#input", "How many simultaneous clients does the X200 support?")
        pg.press("#input", "Enter")
        pg.wait_for_selector(".msg.assistant .sources .source")
        pg.wait_for_function("document.body.dataset.busy === '0'")
        cards = pg.locator(".msg.assistant .source")
        assert cards.count() == 3
        first = cards.first
        assert "guide.en.md" in first.inner_text()
        first.locator("summary").click()
        assert EN_FACT in first.locator(".text").inner_text()  # the card opens on the passage
        assert pg.locator(".msg.assistant .tools .copy").is_visible()
        pg.screenshot(path=str(tmp_path / f"rag-chat-{size[0]}.png"), full_page=False)
        box = pg.locator(".msg.assistant").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= size[0] + 1  # nothing runs off the screen
        n_requests = pg.evaluate("window.lmstackChat.history().length")
        pg.click(".msg.assistant .tools .regenerate")
        pg.wait_for_function("document.body.dataset.busy === '0' && document.querySelectorAll('.msg').length === 2 "
                             "&& document.querySelector('.msg.assistant .sources')")
        assert pg.evaluate("window.lmstackChat.history().length") == n_requests == 2
    finally:
        ctx.close()


def test_web_chat_keeps_conversations_renames_exports_and_deletes(browser, server, tmp_path):
    ctx, pg = _page(browser, server, 1200, 800)
    try:
        pg.evaluate("localStorage.removeItem('lmstack.conversations')")
        pg.fill("#input", "What is the hotline number?")
        pg.press("#input", "Enter")
        pg.wait_for_function("document.body.dataset.busy === '0' && document.querySelector('.msg.assistant .tools')")
        pg.click("#toggle-convs")
        items = pg.locator("#conv-list .conv")
        assert items.count() == 1 and "hotline" in items.first.inner_text()
        pg.once("dialog", lambda d: d.accept("Support line"))
        items.first.locator("button.rename").click()
        assert items.first.locator("button.title").inner_text() == "Support line"
        with pg.expect_download() as dl:
            items.first.locator("button.json").click()
        saved = json.loads(open(dl.value.path(), encoding="utf-8").read())
        assert saved["title"] == "Support line" and [m["role"] for m in saved["messages"]] == ["user", "assistant"]
        assert saved["messages"][1]["sources"][0]["source"] == "notes.en.txt"
        with pg.expect_download() as dl:
            items.first.locator("button.md").click()
        md = open(dl.value.path(), encoding="utf-8").read()
        assert md.startswith("# Support line") and "What is the hotline number?" in md
        pg.click("#new-chat")
        assert pg.locator(".msg").count() == 0
        items.first.locator("button.title").click()  # reopened: both turns and the source cards come back
        n_sources = len(saved["messages"][1]["sources"])
        assert pg.locator(".msg").count() == 2 and pg.locator(".msg.assistant .source").count() == n_sources >= 1
        assert pg.evaluate("window.lmstackChat.history().length") == 2
        pg.once("dialog", lambda d: d.accept())
        items.first.locator("button.delete").click()
        assert items.count() == 0 and pg.locator(".msg").count() == 0
        assert pg.evaluate("JSON.parse(localStorage.getItem('lmstack.conversations'))") == []
    finally:
        ctx.close()


def test_cli_ask_and_eval_with_a_model(server, tmp_path, capsys):
    from lmstack.cli import main

    index, model = str(server.root / "docs.sqlite"), str(server.root / "tiny")
    assert main(["rag", "ask", "How many simultaneous clients does the X200 support?", "--index", index,
                 "--model", model, "--k", "2", "--max-tokens", "4", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str) and [s["n"] for s in out["sources"]] == [1, 2]
    assert out["sources"][0]["source"] == "guide.en.md"
    qs = tmp_path / "q.jsonl"
    qs.write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in [
        {"question": "What is the hotline number?", "relevant": [{"source": "notes.en.txt", "contains": "555-0100"}]},
        {"question": "怎么恢复出厂设置？", "relevant": ["manual.zh.pdf#1"]}]) + "\n")
    assert main(["rag", "eval", "--index", index, "-q", str(qs), "--k", "1", "--k", "3", "--model", model,
                 "--answer-k", "2", "--max-tokens", "4", "--device", "cpu", "-o", str(tmp_path / "r.json")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["questions"] == 2 and rep["recall@3"] == 1.0 and rep["en"]["questions"] == rep["zh"]["questions"] == 1
    assert 0.0 <= rep["cited"] <= 1.0 and "faithfulness" in rep and "citation_accuracy" in rep
    assert len(json.loads((tmp_path / "r.json").read_text())["answers"]) == 2
