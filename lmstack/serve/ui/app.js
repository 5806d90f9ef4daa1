// lmstack web chat: multi-turn, streaming (SSE over fetch), markdown, stop button, sampling settings.
// Talks to this server's OpenAI-compatible /v1/chat/completions; no external requests.
(function () {
  "use strict";
  var CFG = window.LMSTACK || {};
  var $ = function (id) { return document.getElementById(id); };
  var history = [];          // [{role, content}] of completed turns (what the next request sends)
  var controller = null;     // AbortController of the request in flight
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
    messages = messages.concat(history);
    var body = {
      model: CFG.model, messages: messages, stream: true, stream_options: { include_usage: true },
      temperature: num("temperature", parseFloat), top_p: num("top_p", parseFloat),
      max_tokens: num("max_tokens", parseInt), top_k: num("top_k", parseInt),
      repetition_penalty: num("repetition_penalty", parseFloat), seed: num("seed", parseInt),
    };
    Object.keys(body).forEach(function (k) { if (body[k] === undefined) delete body[k]; });
    return body;
  }

  function errorText(status, payload) {
    var msg = payload && payload.error && payload.error.message;
    return "Error " + status + ": " + (msg || "request failed");
  }

  async function send(text) {
    if (controller) return;
    history.push({ role: "user", content: text });
    addMessage("user", text);
    var div = addMessage("assistant", "");
    div.classList.add("streaming");
    var body = div.querySelector(".body");
    var content = "", usage = null, finish = null, t0 = performance.now(), tFirst = null, pending = false;
    controller = new AbortController();
    setBusy(true);
    $("status").textContent = "generating…";
    function paint() {
      pending = false;
      body.innerHTML = window.renderMarkdown(content);
      scrollDown();
    }
    var headers = { "Content-Type": "application/json" };
    var key = $("api_key").value.trim();
    if (key) headers["Authorization"] = "Bearer " + key;
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
          var first = false;
          (chunk.choices || []).forEach(function (c) {
            if (c.delta && c.delta.content) {
              if (tFirst === null) { tFirst = performance.now(); first = true; }
              content += c.delta.content;
            }
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
      history.pop();  // the failed turn is not part of the conversation
      div.classList.add("error");
      if (!content) body.textContent = failed; else setMeta(div, failed);
      $("status").textContent = "";
      return;
    }
    history.push({ role: "assistant", content: content });
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

  function newChat() {
    if (controller) controller.abort();
    history = [];
    $("messages").innerHTML = "";
    $("empty").hidden = false;
    $("input").focus();
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

  window.lmstackChat = { send: send, newChat: newChat, history: function () { return history.slice(); } };
  init();
})();
