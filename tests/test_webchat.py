"""The web chat at ``/`` in headless Chromium (Playwright driving Debian's ``chromium``; no `playwright install`).

Needs the system package ``chromium`` (``apt-get install -y chromium``) at /usr/bin/chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest
import torch

from tests.serve_fixtures import LiveServer, shared_model_dir

torch.set_num_threads(2)
KEY = "sk-web"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server():
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    app = create_app(L.load(shared_model_dir()), api_key=KEY, served_model_name="tiny-chat")
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "install the system package: apt-get install -y chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1200, "height": 800})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.requests = []  # type: ignore[attr-defined]
    pg.on("request", lambda r: pg.requests.append(r))  # type: ignore[attr-defined]
    pg.goto(server.url + "/")
    yield pg
    ctx.close()


def configure(page, *, key: str = KEY, max_tokens: int = 12, temperature: str = "0", system: str = "",
              seed: str = "") -> None:
    assert page.locator("#settings").is_visible()  # opens by itself when the server needs a key
    page.fill("#api_key", key)
    page.fill("#seed", seed)
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#system", system)
    page.locator("#temperature").evaluate(
        f"(e) => {{ e.value = '{temperature}'; e.dispatchEvent(new Event('input')); }}")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page) -> None:
    page.wait_for_function("document.body.dataset.busy === '0' && !document.querySelector('.msg.streaming')")


def chat_bodies(page) -> list[dict]:
    return [json.loads(r.post_data) for r in page.requests if r.url.endswith("/v1/chat/completions")]


def test_streaming_multi_turn_chat(page, server, tmp_path):
    assert page.title() == "lmstack chat"
    assert page.inner_text("#model-name") == "tiny-chat"
    configure(page, system="Be brief.")
    send(page, "Hello there")
    wait_idle(page)
    first = page.evaluate("window.lmstackChat.history()")
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"]
    assert "finish: length" in page.inner_text(".msg.assistant .meta")
    # what the page showed is what the API returns for the same request (greedy)
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    body = chat_bodies(page)[0]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 12
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ref = client.chat.completions.create(model="tiny-chat", messages=body["messages"], max_tokens=12, temperature=0)
    assert first[1]["content"] == ref.choices[0].message.content
    # second turn carries the whole conversation
    send(page, "And again?")
    wait_idle(page)
    second = chat_bodies(page)[1]["messages"]
    assert second == [{"role": "system", "content": "Be brief."}, *first, {"role": "user", "content": "And again?"}]
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    # nothing but this server was contacted (no CDN)
    assert all(r.url.startswith(server.url) or r.url.startswith("data:") for r in page.requests)
    page.screenshot(path=str(tmp_path / "webchat.png"))
    if os.environ.get("LMSTACK_SCREENSHOT"):
        page.screenshot(path=os.environ["LMSTACK_SCREENSHOT"])


def test_stop_button_aborts_generation(page, server):
    configure(page, max_tokens=200, temperature="1", seed="7")  # seed 7: no end token in the first 200
    # Click Stop from inside the page as soon as the first token is painted (a Playwright round trip can
    # be slower than the whole generation on a fast machine).
    page.evaluate("""() => new MutationObserver((_, obs) => {
        const body = document.querySelector('.msg.assistant .body');
        if (body && body.textContent.length > 0) {
            window.stopVisible = !document.getElementById('stop').hidden;
            document.getElementById('stop').click(); obs.disconnect(); }
    }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true})""")
    send(page, "Tell me a long story")
    wait_idle(page)
    assert page.evaluate("window.stopVisible") is True
    assert "stopped" in page.inner_text(".msg.assistant .meta")
    assert page.evaluate("window.lmstackChat.history()")[1]["content"]  # the partial reply is kept
    assert chat_bodies(page)[0]["seed"] == 7
    assert page.locator("#send").is_visible()
    deadline = time.time() + 10  # the server aborted the request and freed its KV blocks
    while True:
        text = httpx.get(server.url + "/metrics").text
        if "lmstack_num_requests_running 0.0" in text and "lmstack_kv_cache_blocks_used 0.0" in text:
            break
        assert time.time() < deadline, "request still running after Stop"
        time.sleep(0.05)


def test_wrong_key_shows_error(page):
    configure(page, key="wrong")
    send(page, "Hi")
    wait_idle(page)
    err = page.locator(".msg.assistant.error")
    assert err.count() == 1 and "Error 401" in err.inner_text()
    assert page.evaluate("window.lmstackChat.history()") == []  # the failed turn is not kept


def test_markdown_renderer_is_safe_and_renders(page):
    html = page.evaluate("""() => renderMarkdown([
        '# Title', '', 'Some **bold**, *italic*, `a<b>` and ~~gone~~.', '',
        '- one', '- two', '', '1. first', '2. second', '', '> quoted', '',
        '```python', 'print("<hi>")', '```', '',
        '| a | b |', '|---|---|', '| 1 | 2 |', '',
        '<script>alert(1)</script> <img src=x onerror=alert(1)>',
        '[ok](https://example.com) [bad](javascript:alert(1))'].join('\\n'))""")
    for want in ["<h1>Title</h1>", "<strong>bold</strong>", "<em>italic</em>", "<code>a&lt;b&gt;</code>",
                 "<del>gone</del>", "<ul><li>one</li><li>two</li></ul>", "<ol><li>first</li><li>second</li></ol>",
                 "<blockquote><p>quoted</p></blockquote>",
                 '<pre><code class="language-python">print(&quot;&lt;hi&gt;&quot;)</code></pre>',
                 "<th>a</th>", "<td>2</td>", "&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;img src=x",
                 '<a href="https://example.com" target="_blank" rel="noopener noreferrer">ok</a>']:
        assert want in html, want
    assert "javascript:" not in html.replace("bad", "")  # the unsafe link is dropped, its text kept
    # rendered into the page, no element from the model's text exists
    n = page.evaluate("""() => { const d = document.createElement('div');
        d.innerHTML = renderMarkdown('<script>window.pwned=1</script><img src=x onerror="window.pwned=1">');
        document.body.appendChild(d); return d.querySelectorAll('script,img').length; }""")
    assert n == 0 and page.evaluate("window.pwned === undefined")


def test_code_tools_are_run_by_the_server_and_fed_back(browser, tmp_path):
    """`lmstack code serve`'s web chat: the page offers the server's tools, runs the model's call through
    /v1/code/tools/NAME, shows the call and its result as a card, sends the result back as a role "tool" message,
    and keeps the round in the saved conversation. The first request is forced to call run_tests (a random model
    would not choose to); everything else is the real server."""
    import subprocess

    from lmstack.apps.code.server import CodeTools, ToolsMiddleware
    from lmstack.serve.api import create_app
    from lmstack.serve.llm import load
    from tests.serve_fixtures import tiny_model_dir

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (repo / "test_calc.py").write_text("import unittest\nfrom calc import add\n\n\nclass T(unittest.TestCase):\n"
                                       "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    llm = load(tiny_model_dir(tmp_path / "m", max_position_embeddings=2048), max_num_seqs=4)
    app = ToolsMiddleware(create_app(llm, api_key=KEY, served_model_name="tiny-code"),
                          CodeTools(repo, "python -m unittest -q"), KEY)
    with LiveServer(app) as srv:
        ctx = browser.new_context(viewport={"width": 1200, "height": 800})
        pg = ctx.new_page()
        pg.set_default_timeout(90_000)
        bodies: list[dict] = []

        def force_first_call(route, request):
            body = json.loads(request.post_data)
            bodies.append(json.loads(request.post_data))
            if len(bodies) == 1:
                body["tool_choice"] = {"type": "function", "function": {"name": "run_tests"}}
            body["max_tokens"] = 160 if len(bodies) == 1 else 8  # room for the whole call; then a short reply
            route.continue_(post_data=json.dumps(body))

        pg.route("**/v1/chat/completions", force_first_call)
        pg.goto(srv.url + "/")
        configure(pg, temperature="0")
        pg.dispatch_event("#api_key", "change")
        pg.wait_for_function("!document.getElementById('tools-bar').hidden")
        assert "read_file, run_tests" in pg.text_content("#tools-info")
        send(pg, "Do the tests pass?")
        pg.wait_for_selector(".msg.tool .tool-result:not(:text('running…'))")
        wait_idle(pg)
        assert [t["function"]["name"] for t in bodies[0]["tools"]] == ["read_file", "run_tests"]
        card = pg.locator(".msg.tool").first
        assert "run_tests" in card.locator("summary").text_content()
        result = json.loads(card.locator(".tool-result").text_content())
        assert result["passed"] is False and "AssertionError" in result["output"]  # the server ran the repo's tests
        assert len(bodies) >= 2  # the result went back to the model
        sent = bodies[1]["messages"]
        call = next(m for m in sent if m.get("tool_calls"))["tool_calls"][0]
        back = next(m for m in sent if m["role"] == "tool")
        assert call["function"]["name"] == "run_tests" and call["id"] and back["tool_call_id"] == call["id"]
        assert json.loads(back["content"]) == result
        assert pg.locator("#messages > .msg").last.get_attribute("class").startswith("msg assistant") or \
            len(bodies) == 4  # the model answered after the tool (or hit the round limit)

        pg.reload()  # the saved conversation brings the card back
        pg.click("#toggle-convs")
        pg.locator("#conv-list .title").first.click()
        assert "run_tests" in pg.locator(".msg.tool summary").first.text_content()
        ctx.close()
