// lmstack web chat: multi-turn, streaming (SSE over fetch), markdown, stop button, sampling settings, copy and
// regenerate; with `lmstack serve --rag`: source cards under each answer and document upload into the index;
// with `lmstack code serve`: the server's tools (read_file, run_tests) offered to the model, its calls run by the
// server and fed back (the OpenAI tool loop, bounded rounds). Talks to this server's OpenAI-compatible
// /v1/chat/completions (and /v1/rag, /v1/code/tools); no external requests.
(function () {
  "use strict";
  var CFG = window.LMSTACK || {};
  var $ = function (id) { return document.getElementById(id); };
  var history = [];          // [{role, content[, tool_calls | tool_call_id]}] of completed turns (what is sent next)
  var controller = null;     // AbortController of the request in flight
  var convId = null;         // the conversation on screen (saved in localStorage under lmstack.conversations)
  var rag = null;            // GET /v1/rag when the server answers from a document index
  var serverTools = null;    // GET /v1/code/tools: the tools this server runs (lmstack code serve)
  var MAX_TOOL_ROUNDS = 4;   // model -> tool -> model rounds per user message
  var SETTINGS = ["system", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed", "api_key"];

  function loadSettings() {
    var saved = {};
    try { saved = JSON.parse(localStorage.getItem("lmstack.settings") || "{}"); } catch (e) { saved = {}; }
    SETTINGS.forEach(function (k) { if (saved[k] !== undefined && $(k)) $(k).value = saved[k]; });
    ["temperature", "top_p"].forEach(function (k) { $(k + "-out").textContent = $(k).value; });
  }

  function saveSettings() {
    var s = {};
    SETTINGS.forEach(function (k) { s[k] = $(k).value; });
    try { localStorage.setItem("lmstack.settings", JSON.stringify(s)); } catch (e) { /* private mode */ }
  }

  function setBusy(busy) {
    document.body.dataset.busy = busy ? "1" : "0";
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("input").disabled = false;
  }

  function scrollDown() { var c = $("chat"); c.scrollTop = c.scrollHeight; }

  function addMessage(role, text) {
    $("empty").hidden = true;
    var div = document.createElement("div");
    div.className = "msg " + role;
    var body = document.createElement("div");
    body.className = "body";
    if (role === "user") body.textContent = text; else body.innerHTML = window.renderMarkdown(text);
    div.appendChild(body);
    $("messages").appendChild(div);
    scrollDown();
    return div;
  }

  function authHeaders() {
    var h = {};
    var key = $("api_key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // Source cards: one per retrieved passage ("[n] file p. 3 > heading"), cited ones first and marked; a click
  // opens the passage's text. [n] in the answer scrolls to card n.
  function addSources(div, sources) {
    if (!sources || !sources.length) return;
    var box = document.createElement("div");
    box.className = "sources";
    var ordered = sources.filter(function (s) { return s.cited; })
      .concat(sources.filter(function (s) { return !s.cited; }));
    ordered.forEach(function (s) {
      var card = document.createElement("details");
      card.className = "source" + (s.cited ? " cited" : "");
      card.dataset.n = String(s.n);
      var sum = document.createElement("summary");
      var num = document.createElement("span");
      num.className = "n";
      num.textContent = "[" + s.n + "]";
      var where = document.createElement("span");
      where.className = "where";
      where.textContent = s.source + (s.page ? " p. " + s.page : "") + (s.headings ? " › " + s.headings : "");
      sum.appendChild(num);
      sum.appendChild(where);
      card.appendChild(sum);
      var text = document.createElement("div");
      text.className = "text";
      text.textContent = s.text;
      card.appendChild(text);
      box.appendChild(card);
    });
    div.appendChild(box);
    var body = div.querySelector(".body");
    body.addEventListener("click", function (e) {
      var t = e.target.closest("a.cite");
      if (!t) return;
      e.preventDefault();
      var card = box.querySelector('.source[data-n="' + t.dataset.n + '"]');
      if (card) { card.open = true; card.scrollIntoView({ block: "nearest" }); }
    });
    linkCitations(body, sources.length);
  }

  function linkCitations(body, n) {
    var walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT), nodes = [];
    while (walker.nextNode()) if (/\[\d{1,3}\]/.test(walker.currentNode.nodeValue) &&
                                  !walker.currentNode.parentNode.closest("code, pre")) nodes.push(walker.currentNode);
    nodes.forEach(function (node) {
      var frag = document.createDocumentFragment(), last = 0, text = node.nodeValue, re = /\[(\d{1,3})\]/g, m;
      while ((m = re.exec(text))) {
        var k = parseInt(m[1], 10);
        if (k < 1 || k > n) continue;
        frag.appendChild(document.createTextNode(text.slice(last, m.index)));
        var a = document.createElement("a");
        a.className = "cite"; a.href = "#"; a.dataset.n = String(k); a.textContent = m[0];
        frag.appendChild(a);
        last = m.index + m[0].length;
      }
      frag.appendChild(document.createTextNode(text.slice(last)));
      node.parentNode.replaceChild(frag, node);
    });
  }

  // Copy (the answer's markdown) and Regenerate (the last answer only: the same history, a new reply).
  function addTools(div, content, last) {
    var tools = document.createElement("div");
    tools.className = "tools";
    var copy = document.createElement("button");
    copy.className = "ghost small copy"; copy.type = "button"; copy.textContent = "Copy";
    copy.addEventListener("click", function () {
      var done = function () { copy.textContent = "Copied"; setTimeout(function () { copy.textContent = "Copy"; }, 1200); };
      if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(content).then(done, done);
      else {
        var ta = document.createElement("textarea"); ta.value = content; document.body.appendChild(ta);
        ta.select(); try { document.execCommand("copy"); } catch (e) { /* nothing to do */ }
        ta.remove(); done();
      }
    });
    tools.appendChild(copy);
    if (last) {
      var again = document.createElement("button");
      again.className = "ghost small regenerate"; again.type = "button"; again.textContent = "Regenerate";
      again.addEventListener("click", regenerate);
      tools.appendChild(again);
    }
    div.appendChild(tools);
  }

  function regenerate() {
    if (controller || history.length < 2 || history[history.length - 1].role !== "assistant") return;
    while (history.length && history[history.length - 1].role !== "user") history.pop();  // answer, tool rounds
    var user = history.pop();
    var box = $("messages");
    while (box.lastChild && !box.lastChild.classList.contains("user")) box.removeChild(box.lastChild);
    if (box.lastChild) box.removeChild(box.lastChild);  // its question (send() adds it back)
    send(user.content);
  }

  function setMeta(div, text) {
    var m = div.querySelector(".meta");
    if (!m) { m = document.createElement("div"); m.className = "meta"; div.appendChild(m); }
    m.textContent = text;
  }

  function num(id, parse) {
    var v = $(id).value.trim();
    if (v === "") return undefined;
    var x = parse(v);
    return isNaN(x) ? undefined : x;
  }

  function requestBody() {
    var messages = [];
    var sys = $("system").value.trim();
    if (sys) messages.push({ role: "system", content: sys });
    messages = messages.concat(history.map(function (m) {
      var o = { role: m.role, content: m.content };
      if (m.tool_calls) o.tool_calls = m.tool_calls;
      if (m.tool_call_id) o.tool_call_id = m.tool_call_id;
      return o;
    }));
    var body = {
      model: CFG.model, messages: messages, stream: true, stream_options: { include_usage: true },
      temperature: num("temperature", parseFloat), top_p: num("top_p", parseFloat),
      max_tokens: num("max_tokens", parseInt), top_k: num("top_k", parseInt),
      repetition_penalty: num("repetition_penalty", parseFloat), seed: num("seed", parseInt),
    };
    if (serverTools && serverTools.length) body.tools = serverTools;  // tool_choice: the server's default, auto
    Object.keys(body).forEach(function (k) { if (body[k] === undefined) delete body[k]; });
    return body;
  }

  function errorText(status, payload) {
    var msg = payload && payload.error && payload.error.message;
    return "Error " + status + ": " + (msg || "request failed");
  }

  // A tool call as a card: the call (name and arguments) and, once the server ran it, its result.
  function addToolCard(name, args) {
    $("empty").hidden = true;
    var div = document.createElement("div");
    div.className = "msg tool";
    var det = document.createElement("details");
    det.open = true;
    var sum = document.createElement("summary");
    sum.textContent = "\u2699 " + name + " " + (args || "");
    var pre = document.createElement("pre");
    pre.className = "tool-result";
    pre.textContent = "running\u2026";
    det.appendChild(sum); det.appendChild(pre);
    div.appendChild(det);
    $("messages").appendChild(div);
    scrollDown();
    return div;
  }

  function setToolResult(card, text, ok) {
    card.querySelector(".tool-result").textContent = text;
    if (!ok) card.classList.add("error");
  }

  async function runTool(call) {
    var card = addToolCard(call.function.name, call.function.arguments);
    var headers = authHeaders();
    headers["Content-Type"] = "application/json";
    var result, ok = false;
    try {
      var r = await fetch("/v1/code/tools/" + encodeURIComponent(call.function.name), {
        method: "POST", headers: headers, body: call.function.arguments || "{}",
      });
      var out = await r.json();
      ok = r.ok;
      result = ok ? out : { error: (out.error && out.error.message) || ("error " + r.status) };
    } catch (e) { result = { error: e.message || String(e) }; }
    var text = JSON.stringify(result, null, 2);
    setToolResult(card, text, ok);
    return { role: "tool", tool_call_id: call.id, content: JSON.stringify(result) };
  }

  async function send(text) {
    if (controller) return;
    history.push({ role: "user", content: text });
    addMessage("user", text);
    await respond(0);
  }

  // One model turn; when it calls the server's tools, run them, send the results back and answer again.
  async function respond(round) {
    var calls = [];
    var div = addMessage("assistant", "");
    div.classList.add("streaming");
    var body = div.querySelector(".body");
    var sources = null;
    var content = "", usage = null, finish = null, t0 = performance.now(), tFirst = null, pending = false;
    controller = new AbortController();
    setBusy(true);
    $("status").textContent = "generating…";
    function paint() {
      pending = false;
      body.innerHTML = window.renderMarkdown(content);
      scrollDown();
    }
    var headers = authHeaders();
    headers["Content-Type"] = "application/json";
    var stopped = false, failed = null;
    try {
      var req = requestBody();
      var resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers, body: JSON.stringify(req), signal: controller.signal,
      });
      var payload = null;
      if (!resp.ok) {
        try { payload = await resp.json(); } catch (e) { payload = null; }
        if (resp.status === 400 && payload && payload.error && payload.error.param === "max_tokens" &&
            req.max_tokens !== undefined) {
          // The conversation grew: let the reply use whatever context is left instead of failing.
          delete req.max_tokens;
          resp = await fetch("/v1/chat/completions", {
            method: "POST", headers: headers, body: JSON.stringify(req), signal: controller.signal,
          });
          if (!resp.ok) { try { payload = await resp.json(); } catch (e) { payload = null; } }
        }
        if (!resp.ok) throw new Error(errorText(resp.status, payload));
      }
      var reader = resp.body.getReader(), decoder = new TextDecoder(), buf = "";
      outer: while (true) {
        var r = await reader.read();
        if (r.done) break;
        buf += decoder.decode(r.value, { stream: true });
        var idx;
        while ((idx = buf.indexOf("\n\n")) >= 0) {
          if (controller.signal.aborted) { stopped = true; break outer; }  // Stop while a read was buffered
          var event = buf.slice(0, idx);
          buf = buf.slice(idx + 2);
          var data = event.split("\n").filter(function (l) { return l.indexOf("data:") === 0; })
            .map(function (l) { return l.slice(5).trim(); }).join("\n");
          if (!data) continue;
          if (data === "[DONE]") break outer;
          var chunk = JSON.parse(data);
          if (chunk.error) throw new Error("Error: " + chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          if (chunk.sources) sources = chunk.sources;
          var first = false;
          (chunk.choices || []).forEach(function (c) {
            if (c.delta && c.delta.content) {
              if (tFirst === null) { tFirst = performance.now(); first = true; }
              content += c.delta.content;
            }
            ((c.delta && c.delta.tool_calls) || []).forEach(function (d) {
              var i = d.index || 0;
              var t = calls[i] || (calls[i] = { id: "", type: "function", function: { name: "", arguments: "" } });
              if (d.id) t.id = d.id;
              if (d.function && d.function.name) t.function.name = d.function.name;
              if (d.function && d.function.arguments) t.function.arguments += d.function.arguments;
            });
            if (c.finish_reason) finish = c.finish_reason;
          });
          // The first token is painted at once (time to first token is what a user feels; animation
          // frames can also be throttled in background tabs); later ones are batched per frame.
          if (first) {
            paint();
            await new Promise(function (r) { setTimeout(r, 0); });  // let a Stop click land even if the
          }                                                         // whole reply arrived in one read
          else if (!pending) { pending = true; requestAnimationFrame(paint); }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") stopped = true; else failed = e.message || String(e);
    }
    paint();
    div.classList.remove("streaming");
    controller = null;
    setBusy(false);
    if (failed) {
      if (round === 0) history.pop();  // the failed turn is not part of the conversation
      div.classList.add("error");
      if (!content) body.textContent = failed; else setMeta(div, failed);
      $("status").textContent = "";
      return;
    }
    var turn = { role: "assistant", content: content };
    calls = calls.filter(function (c) { return c && c.function.name; });
    if (calls.length) turn.tool_calls = calls;
    if (sources) turn.sources = sources;  // kept with the conversation (not sent back to the server)
    history.push(turn);
    if (calls.length && !content) div.remove();  // the cards below show the call
    if (calls.length && !stopped && serverTools) {
      if (round + 1 >= MAX_TOOL_ROUNDS) {
        setMeta(div, "stopped after " + MAX_TOOL_ROUNDS + " tool rounds");
      } else {
        controller = new AbortController();  // busy while the tools run
        setBusy(true);
        $("status").textContent = "running " + calls.map(function (c) { return c.function.name; }).join(", ") + "\u2026";
        for (var i = 0; i < calls.length; i++) history.push(await runTool(calls[i]));
        controller = null;
        saveConversation();
        return respond(round + 1);
      }
    }
    saveConversation();
    document.querySelectorAll("#messages .regenerate").forEach(function (b) { b.remove(); });
    addSources(div, sources);
    addTools(div, content, true);
    var secs = (performance.now() - t0) / 1000;
    var parts = [];
    if (stopped) parts.push("stopped");
    else if (finish) parts.push("finish: " + finish);
    if (usage) {
      parts.push(usage.completion_tokens + " tokens");
      if (tFirst !== null) parts.push("first token " + ((tFirst - t0) / 1000).toFixed(2) + " s");
      parts.push((usage.completion_tokens / Math.max(secs, 1e-3)).toFixed(1) + " tok/s");
    }
    setMeta(div, parts.join(" · "));
    $("status").textContent = "";
    $("input").focus();
  }

  // ---- conversations, kept in this browser (localStorage): list, open, rename, delete, export JSON / Markdown
  function loadConvs() {
    try { var c = JSON.parse(localStorage.getItem("lmstack.conversations") || "[]"); return Array.isArray(c) ? c : []; }
    catch (e) { return []; }
  }

  function storeConvs(convs) {
    try { localStorage.setItem("lmstack.conversations", JSON.stringify(convs)); } catch (e) { /* full or private */ }
    renderConvs();
  }

  function saveConversation() {
    if (!history.length) return;
    var convs = loadConvs(), c = convs.filter(function (x) { return x.id === convId; })[0];
    if (!c) {
      convId = "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 6);
      c = { id: convId, title: history[0].content.slice(0, 60) };
      convs.unshift(c);
    }
    c.messages = history.slice();
    c.updated = new Date().toISOString();
    c.model = CFG.model;
    storeConvs(convs);
  }

  function openConversation(id) {
    if (controller) return;
    var c = loadConvs().filter(function (x) { return x.id === id; })[0];
    if (!c) return;
    convId = id;
    history = (c.messages || []).slice();
    $("messages").innerHTML = "";
    $("empty").hidden = history.length > 0;
    history.forEach(function (m, i) {
      if (m.role === "tool") {
        var prev = history.slice(0, i).reverse().filter(function (x) { return x.tool_calls; })[0];
        var call = prev && prev.tool_calls.filter(function (c) { return c.id === m.tool_call_id; })[0];
        var card = addToolCard(call ? call.function.name : "tool", call ? call.function.arguments : "");
        var txt = m.content;
        try { txt = JSON.stringify(JSON.parse(m.content), null, 2); } catch (e) { /* plain text */ }
        setToolResult(card, txt, true);
        return;
      }
      if (m.tool_calls && !m.content) return;  // shown by the tool cards that follow
      var div = addMessage(m.role, m.content);
      if (m.role === "assistant") {
        addSources(div, m.sources);
        addTools(div, m.content, i === history.length - 1);
      }
    });
    renderConvs();
  }

  function download(name, type, text) {
    var a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], { type: type }));
    a.download = name;
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 0);
  }

  function markdownOf(c) {
    var out = ["# " + c.title, ""];
    (c.messages || []).forEach(function (m) {
      (m.tool_calls || []).forEach(function (t) {
        out.push("**Tool call:** `" + t.function.name + " " + t.function.arguments + "`", "");
      });
      if (m.role === "tool") { out.push("**Tool result:**", "", "```json", m.content, "```", ""); return; }
      if (!m.content) return;
      out.push("**" + (m.role === "user" ? "You" : "Assistant") + ":**", "", m.content, "");
      (m.sources || []).filter(function (s) { return s.cited; }).forEach(function (s) {
        out.push("> [" + s.n + "] " + s.source + (s.page ? " p. " + s.page : "") + ": " + s.text.replace(/\n/g, " "));
      });
      if ((m.sources || []).some(function (s) { return s.cited; })) out.push("");
    });
    return out.join("\n");
  }

  function convAction(id, action) {
    var convs = loadConvs(), c = convs.filter(function (x) { return x.id === id; })[0];
    if (!c) return;
    var slug = (c.title || "chat").replace(/[^\w\u4e00-\u9fff-]+/g, "-").slice(0, 40) || "chat";
    if (action === "rename") {
      var t = window.prompt("Rename conversation", c.title);
      if (t && t.trim()) { c.title = t.trim().slice(0, 200); storeConvs(convs); }
    } else if (action === "delete") {
      if (!window.confirm("Delete \u201c" + c.title + "\u201d?")) return;
      storeConvs(convs.filter(function (x) { return x.id !== id; }));
      if (id === convId) newChat();
    } else if (action === "json") {
      download(slug + ".json", "application/json", JSON.stringify(c, null, 1));
    } else if (action === "md") {
      download(slug + ".md", "text/markdown", markdownOf(c));
    }
  }

  function renderConvs() {
    var list = $("conv-list");
    list.innerHTML = "";
    loadConvs().forEach(function (c) {
      var li = document.createElement("li");
      li.className = "conv" + (c.id === convId ? " current" : "");
      li.dataset.id = c.id;
      var open = document.createElement("button");
      open.className = "ghost title"; open.type = "button"; open.textContent = c.title || "(untitled)";
      open.addEventListener("click", function () { openConversation(c.id); });
      li.appendChild(open);
      [["rename", "Rename"], ["delete", "Delete"], ["json", "JSON"], ["md", "MD"]].forEach(function (a) {
        var b = document.createElement("button");
        b.className = "ghost small " + a[0]; b.type = "button"; b.textContent = a[1];
        b.title = { rename: "Rename", delete: "Delete", json: "Export as JSON", md: "Export as Markdown" }[a[0]];
        b.addEventListener("click", function () { convAction(c.id, a[0]); });
        li.appendChild(b);
      });
      list.appendChild(li);
    });
    $("conv-empty").hidden = list.children.length > 0;
  }

  function newChat() {
    if (controller) controller.abort();
    convId = null;
    renderConvs();
    history = [];
    $("messages").innerHTML = "";
    $("empty").hidden = false;
    $("input").focus();
  }

  async function loadRag() {
    try {
      var r = await fetch("/v1/rag", { headers: authHeaders() });
      rag = r.ok ? await r.json() : null;
    } catch (e) { rag = null; }
    $("rag-bar").hidden = !rag;
    if (!rag) return;
    $("rag-info").textContent = "Answers from " + rag.index + " · " + rag.documents + " documents, " + rag.chunks +
      " passages";
    $("upload-label").hidden = !rag.upload;
  }

  async function loadTools() {
    try {
      var r = await fetch("/v1/code/tools", { headers: authHeaders() });
      serverTools = r.ok ? (await r.json()).tools : null;
    } catch (e) { serverTools = null; }
    $("tools-bar").hidden = !(serverTools && serverTools.length);
    if (serverTools) $("tools-info").textContent = "Tools the model may call (run by this server): " +
      serverTools.map(function (t) { return t["function"].name; }).join(", ");
  }

  async function upload(files) {
    for (var i = 0; i < files.length; i++) {
      var f = files[i];
      $("status").textContent = "indexing " + f.name + "…";
      try {
        var r = await fetch("/v1/rag/documents?name=" + encodeURIComponent(f.name),
                            { method: "POST", headers: authHeaders(), body: f });
        var out = await r.json();
        if (r.ok) $("status").textContent = "indexed " + f.name;
        else $("status").textContent = f.name + ": " + ((out.failed && out.failed[0] && out.failed[0].reason) ||
                                                         (out.error && out.error.message) || ("error " + r.status));
      } catch (e) { $("status").textContent = f.name + ": " + (e.message || e); }
    }
    $("upload").value = "";
    loadRag();
  }

  function init() {
    $("model-name").textContent = CFG.model || "";
    $("empty-model").textContent = CFG.model || "the model";
    $("api-key-row").hidden = !CFG.needsKey;
    loadSettings();
    setBusy(false);
    SETTINGS.forEach(function (k) { $(k).addEventListener("change", saveSettings); });
    ["temperature", "top_p"].forEach(function (k) {
      $(k).addEventListener("input", function () { $(k + "-out").textContent = $(k).value; });
    });
    $("toggle-settings").addEventListener("click", function () {
      var s = $("settings");
      s.hidden = !s.hidden;
      this.setAttribute("aria-expanded", String(!s.hidden));
    });
    if (CFG.needsKey && !$("api_key").value) $("settings").hidden = false;
    $("new-chat").addEventListener("click", newChat);
    $("toggle-convs").addEventListener("click", function () {
      var s = $("conversations");
      s.hidden = !s.hidden;
      this.setAttribute("aria-expanded", String(!s.hidden));
    });
    renderConvs();
    $("upload").addEventListener("change", function () { upload(this.files); });
    $("api_key").addEventListener("change", function () { loadRag(); loadTools(); });
    loadRag();
    loadTools();
    $("stop").addEventListener("click", function () { if (controller) controller.abort(); });
    $("composer").addEventListener("submit", function (e) {
      e.preventDefault();
      var text = $("input").value.trim();
      if (!text || controller) return;
      $("input").value = "";
      autosize();
      send(text);
    });
    $("input").addEventListener("keydown", function (e) {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    function autosize() {
      var t = $("input");
      t.style.height = "auto";
      t.style.height = Math.min(t.scrollHeight, 200) + "px";
    }
    $("input").addEventListener("input", autosize);
  }

  window.lmstackChat = { send: send, newChat: newChat, regenerate: regenerate, open: openConversation,
                         history: function () { return history.slice(); } };
  init();
})();
