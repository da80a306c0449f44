// ctxsim search page: plain JavaScript, no build step, nothing loaded from elsewhere (docs/SERVING.md).
// Every URL is relative, so the page also works behind a proxy that serves it under a prefix.
"use strict";
(() => {
  const TOKEN_KEY = "ctxsim.token";
  const MAX_THUMBS = 2000;  // cached blob: URLs, dropped all at once beyond this
  const $ = (id) => document.getElementById(id);
  const pollSeconds = Number(new URLSearchParams(location.search).get("poll")) || 5;
  const POLL_MS = Math.max(500, 1000 * pollSeconds);
  const TITLES = {
    400: "Bad request", 401: "Token needed", 404: "Not found", 405: "Not allowed", 413: "Too large",
    415: "Not an image", 422: "Refused", 429: "Too many requests", 500: "Server error", 503: "Unavailable",
  };

  const state = {
    query: null,       // {kind: "upload", blob, name} or {kind: "item", id, path, label}
    seq: 0,            // the newest search: answers to older ones are dropped
    generation: null,  // the served index generation last seen in /info
    fingerprint: null, // the served model last seen in /info
    maxK: 1000,
    maxUpload: null,
    queryURL: null,    // blob: URL of an uploaded query, revoked when replaced
    thumbs: new Map(), // "generation:id" -> Promise of a blob: URL
  };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // ------------------------------------------------------------------------------------------ helpers
  const basename = (p) => String(p).split(/[\\/]/).pop();
  const short = (fp) => (fp && fp.length > 12 ? fp.slice(0, 12) + "…" : fp || "-");
  function mb(n) { return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MB` : `${Math.ceil(n / 1024)} kB`; }
  function num(x) { return typeof x === "number" ? x.toLocaleString("en") : String(x); }
  function set(id, text, title) {
    const el = $(id);
    el.textContent = text;
    if (title !== undefined) el.title = title || "";
    return el;
  }
  // Text that may wrap after _ / . - (e.g. "Alphabet__character07"), as text nodes and <wbr>s: its text is unchanged.
  function breakable(text) {
    const out = [];
    for (const part of String(text).split(/(?<=[_/.-])(?![_/.-])/)) {
      out.push(document.createTextNode(part), document.createElement("wbr"));
    }
    return out;
  }
  function status(text) { $("status").textContent = text; }
  function showMessage(text) { const m = $("message"); m.textContent = text; m.hidden = false; }
  function hideMessage() { $("message").hidden = true; $("message").textContent = ""; }

  async function readable(response) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON: use the status line */ }
    const title = TITLES[response.status] || "Error";
    let text = body && typeof body.error === "string" ? body.error : response.statusText || "no reason given";
    if (body && body.limit) text += ` (limit ${body.limit} = ${num(body.maximum)}, this image: ${num(body.value)})`;
    return `${title} (${response.status}): ${text}`;
  }

  // ------------------------------------------------------------------------------------------ the API, with the token
  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  function askToken(refused) {
    const form = $("token-form");
    set("token-prompt", refused ? "The server refused that token; enter the right one."
      : "This server needs a token.");
    if (form.hidden) {
      form.hidden = false;
      $("token-input").focus();
    }
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const sent = token();
    if (sent) headers.set("Authorization", `Bearer ${sent}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (e) {
      throw new ApiError(0, `Cannot reach the server (${e.message}).`);
    }
    if (response.status === 401) {
      askToken(Boolean(sent));
      throw new ApiError(401, await readable(response));
    }
    if (!response.ok) throw new ApiError(response.status, await readable(response));
    return response;
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("token-form").hidden = true;
    state.fingerprint = null;  // fetch the model description again, now with the token
    refreshInfo();
    if (state.query) search(state.query);
  });

  // ------------------------------------------------------------------------------------------ what is served
  const VERDICTS = { passed: "passed", failed: "FAILED", none: "no verdict", reference: "reference (PyTorch fp32)" };

  async function refreshModel() {
    try {
      const m = await (await api("model")).json();
      set("served-precision", m.precision || "-");
      const p = m.parity || {};
      const detail = [m.artifact, p.detail, ...(p.failures || [])].filter(Boolean).join("; ");
      const el = set("served-parity", VERDICTS[p.verdict] || p.verdict || "-", detail);
      el.className = `verdict-${p.verdict}`;
    } catch (e) {
      if (e.status !== 401) set("served-parity", "?", e.message);
    }
  }

  async function refreshInfo() {
    let info;
    try {
      info = await (await api("info")).json();
    } catch (e) {
      if (e.status !== 401) set("served-generation", "?", e.message);
      return;
    }
    const ix = info.index || {};
    if (state.generation !== null && ix.generation !== state.generation) {
      set("notice-text", `The index was reloaded: generation ${ix.generation}, ${num(ix.count)} items `
        + `(was generation ${state.generation}).`);
      $("notice-again").hidden = !state.query;
      $("notice").hidden = false;
      clearThumbs();
    }
    state.generation = ix.generation;
    if (info.limits) {
      state.maxK = info.limits.max_k || state.maxK;
      state.maxUpload = info.limits.max_upload_bytes || null;
      $("k").max = String(state.maxK);
    }
    set("served-fingerprint", short(info.fingerprint), info.fingerprint);
    set("served-backend", info.backend || "-");
    set("served-index", ix.type || "-", ix.params ? JSON.stringify(ix.params) : "");
    set("served-count", num(ix.count));
    const reloadError = info.reload && info.reload.last_error;
    set("served-generation", reloadError ? `${ix.generation} (reload refused)` : String(ix.generation),
      reloadError || "");
    if (info.fingerprint !== state.fingerprint) {
      state.fingerprint = info.fingerprint;
      refreshModel();
    }
  }

  async function poll() {
    if (!document.hidden && $("token-form").hidden) await refreshInfo();
    setTimeout(poll, POLL_MS);
  }

  $("notice-again").addEventListener("click", () => {
    $("notice").hidden = true;
    if (state.query) search(state.query);
  });

  // ------------------------------------------------------------------------------------------ thumbnails
  function thumbURL(id) {
    const key = `${state.generation}:${id}`;
    let url = state.thumbs.get(key);
    if (!url) {
      if (state.thumbs.size >= MAX_THUMBS) clearThumbs();
      url = api(`items/${id}/thumbnail`).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
      url.catch(() => state.thumbs.delete(key));
      state.thumbs.set(key, url);
    }
    return url;
  }

  function clearThumbs() {
    for (const url of state.thumbs.values()) url.then((u) => URL.revokeObjectURL(u), () => {});
    state.thumbs.clear();
  }

  function loadThumb(img) {
    thumbURL(Number(img.dataset.id)).then((u) => { img.src = u; }, (e) => { img.alt = `no thumbnail: ${e.message}`; });
  }

  const observer = "IntersectionObserver" in window
    ? new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (e.isIntersecting) { observer.unobserve(e.target); loadThumb(e.target); }
      }
    }, { rootMargin: "400px" })
    : null;

  // ------------------------------------------------------------------------------------------ searching
  function currentK() {
    const k = Number($("k").value);
    if (!Number.isInteger(k) || k < 1 || k > state.maxK) {
      throw new ApiError(0, `Refused: the number of results must be a whole number from 1 to ${state.maxK}.`);
    }
    return k;
  }

  function showQuery(query) {
    const fig = $("query");
    const img = $("query-img");
    if (state.queryURL) { URL.revokeObjectURL(state.queryURL); state.queryURL = null; }
    fig.dataset.kind = query.kind;
    img.hidden = false;  // hidden again if the browser cannot show it (say a non-image the server will refuse)
    if (query.kind === "upload") {
      state.queryURL = URL.createObjectURL(query.blob);
      img.src = state.queryURL;
      delete fig.dataset.id;
      set("query-caption", `${query.name} (uploaded, ${mb(query.blob.size)})`, "");
    } else {
      img.removeAttribute("src");
      fig.dataset.id = String(query.id);
      thumbURL(query.id).then((u) => { if (state.query === query) img.src = u; }, () => {});
      set("query-caption", `item ${query.id} · ${query.label ?? "no label"} · ${basename(query.path)}`, query.path);
    }
    fig.hidden = false;
  }

  function render(body, query) {
    const list = $("results");
    list.replaceChildren();
    for (const hit of body.results) {
      const li = document.createElement("li");
      li.dataset.id = String(hit.id);
      li.dataset.rank = String(hit.rank);
      li.dataset.path = hit.path;
      if (query.kind === "item" && hit.id === query.id) li.classList.add("self");
      const button = document.createElement("button");
      button.type = "button";
      button.title = `${hit.path}\nClick: more like this`;
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = "";  // the button's text names the item; nothing shows while the image loads
      img.dataset.id = String(hit.id);
      const meta = document.createElement("span");
      meta.className = "meta";
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `#${hit.rank}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = hit.score.toFixed(3);
      meta.append(rank, score);
      const label = document.createElement("span");
      label.className = "label";
      label.append(...breakable(hit.label ?? "(no label)"));
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = basename(hit.path);
      button.append(img, meta, label, name);
      button.addEventListener("click", () => search({ kind: "item", id: hit.id, path: hit.path, label: hit.label }));
      li.append(button);
      list.append(li);
      if (observer) observer.observe(img); else loadThumb(img);
    }
    const fewer = body.results.length < body.k ? ` (the index holds only ${body.results.length})` : "";
    status(`${body.results.length} results for k = ${body.k}${fewer} · ${body.index_type} index`
      + ` · model ${short(body.fingerprint)}`);
  }

  async function search(query) {
    const seq = ++state.seq;
    state.query = query;
    hideMessage();
    showQuery(query);
    try {
      const k = currentK();
      if (query.kind === "upload" && state.maxUpload && query.blob.size > state.maxUpload) {
        throw new ApiError(413, `Too large: ${query.name} is ${mb(query.blob.size)}; this server accepts `
          + `uploads of at most ${mb(state.maxUpload)}.`);
      }
      status("Searching…");
      let response;
      if (query.kind === "upload") {
        const form = new FormData();
        form.append("image", query.blob, query.name);
        form.append("k", String(k));
        response = await api("search", { method: "POST", body: form });
      } else {
        response = await api(`items/${encodeURIComponent(query.id)}/similar?k=${k}`);
      }
      const body = await response.json();
      if (seq === state.seq) render(body, query);
    } catch (e) {
      if (seq !== state.seq) return;
      $("results").replaceChildren();
      if (e.status === 401) status("Enter the token to search.");
      else { status(""); showMessage(e.message); }
    }
  }

  function searchFile(file) {
    if (!file) { showMessage("Refused: nothing to search with (drop or pick an image file)."); return; }
    search({ kind: "upload", blob: file, name: file.name || "pasted image" });
  }

  // ------------------------------------------------------------------------------------------ input
  $("file").addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    ev.target.value = "";  // picking the same file again is a new search
    if (file) searchFile(file);
  });
  $("k").addEventListener("change", () => { if (state.query) search(state.query); });

  const drop = $("drop");
  drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("file").click(); }
  });
  // Anywhere on the page: a file dropped outside the zone must not make the browser navigate away.
  document.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  document.addEventListener("dragleave", (ev) => { if (!ev.relatedTarget) drop.classList.remove("over"); });
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    searchFile(ev.dataTransfer && ev.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (ev) => {
    const file = ev.clipboardData && ev.clipboardData.files[0];
    if (file) { ev.preventDefault(); searchFile(file); }
  });

  $("query-img").addEventListener("error", (ev) => { if (ev.target.getAttribute("src")) ev.target.hidden = true; });
  // Small images (28 px drawings) scaled up as crisp squares, not a blur.
  document.addEventListener("load", (ev) => {
    if (ev.target instanceof HTMLImageElement) ev.target.classList.toggle("tiny", ev.target.naturalWidth < 96);
  }, true);

  refreshInfo();
  setTimeout(poll, POLL_MS);
})();
