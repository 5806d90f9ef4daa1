"""The one-page web chat served at ``/`` (index.html, app.js, markdown.js, style.css; no CDN)."""
