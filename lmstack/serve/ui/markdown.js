// A small, safe Markdown renderer for the lmstack web chat (no dependencies, no network).
//
// Safety: the input is HTML-escaped FIRST; every tag in the output is produced by this file, and link
// targets are limited to http(s) and mailto. Model output can never inject markup or script.
//
// Supported (CommonMark subset): fenced code blocks (```lang), indented text kept in code blocks,
// headings (#..######), paragraphs, hard line breaks, unordered (- * +) and ordered (1.) lists,
// blockquotes (>), horizontal rules (---, ***), tables (| a | b |), inline code, **bold**, *italic*,
// _italic_, ~~strike~~, [links](https://...), bare https:// links.
(function (global) {
  "use strict";

  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function safeUrl(url) {
    // url is already HTML-escaped; decode &amp; only to test the scheme.
    var raw = url.replace(/&amp;/g, "&").trim();
    if (/^(https?:\/\/|mailto:)/i.test(raw)) return url;
    return null;
  }

  // Inline formatting on an ALREADY-ESCAPED line.
  function inline(s) {
    var codes = [];
    s = s.replace(/`([^`]+)`/g, function (_, c) {
      codes.push("<code>" + c + "</code>");
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    var links = [];
    s = s.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, function (m, text, url) {
      var u = safeUrl(url);
      if (!u) return text;
      links.push('<a href="' + u + '" target="_blank" rel="noopener noreferrer">' + text + "</a>");
      return "\u0001" + (links.length - 1) + "\u0001";
    });
    s = s.replace(/(^|[\s(])(https?:\/\/[^\s<)]+)/g, function (m, pre, url) {
      links.push('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + url + "</a>");
      return pre + "\u0001" + (links.length - 1) + "\u0001";
    });
    s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/__([^_]+)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
      .replace(/(^|[^\w_])_([^_\s][^_]*)_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~([^~]+)~~/g, "<del>$1</del>");
    s = s.replace(/\u0001(\d+)\u0001/g, function (_, i) { return links[+i]; });
    s = s.replace(/\u0000(\d+)\u0000/g, function (_, i) { return codes[+i]; });
    return s;
  }

  function isTableSep(line) {
    return /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/.test(line);
  }

  function cells(line) {
    return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map(function (c) {
      return inline(c.trim());
    });
  }

  function render(src) {
    var lines = escapeHtml(String(src || "")).replace(/\r\n?/g, "\n").split("\n");
    var out = [], para = [], i = 0;

    function flush() {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    }

    while (i < lines.length) {
      var line = lines[i];
      var fence = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        var body = [], lang = fence[2];
        i++;
        while (i < lines.length && !new RegExp("^\\s*" + fence[1] + "\\s*$").test(lines[i])) body.push(lines[i++]);
        i++; // closing fence (or end of text while streaming)
        out.push('<pre><code' + (lang ? ' class="language-' + lang + '"' : "") + ">" + body.join("\n") + "</code></pre>");
        continue;
      }
      var h = line.match(/^(#{1,6})\s+(.*?)\s*#*\s*$/);
      if (h) { flush(); out.push("<h" + h[1].length + ">" + inline(h[2]) + "</h" + h[1].length + ">"); i++; continue; }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { flush(); out.push("<hr>"); i++; continue; }
      if (/^\s*&gt;\s?/.test(line)) {
        flush();
        var quote = [];
        while (i < lines.length && /^\s*&gt;\s?/.test(lines[i])) quote.push(lines[i++].replace(/^\s*&gt;\s?/, ""));
        // Re-render the quoted text (it is already escaped, so unescape only what render() escapes again).
        out.push("<blockquote>" + render(unescape(quote.join("\n"))) + "</blockquote>");
        continue;
      }
      var ul = /^\s*[-*+]\s+(.*)$/, ol = /^\s*\d+[.)]\s+(.*)$/;
      if (ul.test(line) || ol.test(line)) {
        flush();
        var ordered = ol.test(line) && !ul.test(line), re = ordered ? ol : ul, items = [];
        while (i < lines.length && re.test(lines[i])) {
          var item = lines[i++].match(re)[1];
          while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !ul.test(lines[i]) && !ol.test(lines[i])) {
            item += "<br>" + lines[i++].trim();
          }
          items.push("<li>" + inline(item) + "</li>");
        }
        out.push((ordered ? "<ol>" : "<ul>") + items.join("") + (ordered ? "</ol>" : "</ul>"));
        continue;
      }
      if (line.indexOf("|") >= 0 && i + 1 < lines.length && isTableSep(lines[i + 1])) {
        flush();
        var head = cells(line), rows = [];
        i += 2;
        while (i < lines.length && lines[i].indexOf("|") >= 0 && lines[i].trim()) rows.push(cells(lines[i++]));
        out.push("<table><thead><tr>" + head.map(function (c) { return "<th>" + c + "</th>"; }).join("") +
          "</tr></thead><tbody>" + rows.map(function (r) {
            return "<tr>" + r.map(function (c) { return "<td>" + c + "</td>"; }).join("") + "</tr>";
          }).join("") + "</tbody></table>");
        continue;
      }
      if (!line.trim()) { flush(); i++; continue; }
      para.push(line);
      i++;
    }
    flush();
    return out.join("\n");
  }

  function unescape(s) {
    return s.replace(/&#39;/g, "'").replace(/&quot;/g, '"').replace(/&gt;/g, ">").replace(/&lt;/g, "<")
      .replace(/&amp;/g, "&");
  }

  global.renderMarkdown = render;
  global.escapeHtml = escapeHtml;
})(window);
