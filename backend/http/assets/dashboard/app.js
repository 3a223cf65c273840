// Tally operations dashboard: plain JS, no build step, no network but this server.
//
// The pasted API key lives only in the closure below: fetch() sends it in the Authorization header,
// and streams (EventSource cannot send headers) get a short-lived stream token from
// POST /v1/stream-tokens in their URL instead. It is never put in a URL, in storage or in a log.
"use strict";

(() => {
  // ---------------------------------------------------------------- money: integer minor units
  const EXPONENTS = { // ISO 4217 minor units, and the crypto units Tally counts in; anything else: 2
    BTC: 8, ETH: 9, USDT: 6, USDC: 6,
    BHD: 3, IQD: 3, JOD: 3, KWD: 3, LYD: 3, OMR: 3, TND: 3,
    BIF: 0, CLP: 0, DJF: 0, GNF: 0, ISK: 0, JPY: 0, KMF: 0, KRW: 0, PYG: 0, RWF: 0, UGX: 0,
    UYI: 0, VND: 0, VUV: 0, XAF: 0, XOF: 0, XPF: 0,
  };
  const exponentOf = (currency) => (currency in EXPONENTS ? EXPONENTS[currency] : 2);

  /** Minor units (a JSON integer or a BigInt) as major units, by string arithmetic only. */
  function formatMoney(minor, currency) {
    const exp = exponentOf(currency);
    let digits = BigInt(minor).toString();
    let sign = "";
    if (digits.startsWith("-")) { sign = "-"; digits = digits.slice(1); }
    digits = digits.padStart(exp + 1, "0");
    const whole = digits.slice(0, digits.length - exp).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return sign + whole + (exp > 0 ? "." + digits.slice(digits.length - exp) : "");
  }

  /** JSON.parse, keeping integers beyond 2^53 exact (as BigInt) where the browser gives the source. */
  function parseJSON(text) {
    return JSON.parse(text, (key, value, context) => {
      if (typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value)
          && context && typeof context.source === "string" && /^-?\d+$/.test(context.source)) {
        return BigInt(context.source);
      }
      return value;
    });
  }

  window.tallyMoney = Object.freeze({ formatMoney, exponentOf, parseJSON }); // for tests; holds no secret

  // ---------------------------------------------------------------- the page
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "class") node.className = value; else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  };

  function setStatus(kind, text) {
    const status = $("status");
    status.className = "status " + kind;
    status.textContent = text;
  }

  // ---------------------------------------------------------------- a session: one pasted key
  class Session {
    constructor(key) {
      let secret = key; // only here; never logged, stored or put in a URL
      this.authorized = (init = {}) => ({ ...init, headers: { ...(init.headers || {}), Authorization: "Bearer " + secret } });
      this.forget = () => { secret = null; };
      this.closed = false;
      this.token = null;
      this.tokenExpires = 0;
      this.tokenTimer = null;
      this.streams = [];
      this.problems = new Set();
    }

    async api(path, init = {}) {
      const answer = await fetch(path, this.authorized({ cache: "no-store", ...init }));
      const text = await answer.text();
      const body = text ? parseJSON(text) : null;
      if (!answer.ok) {
        const error = new Error((body && (body.detail || body.title)) || "HTTP " + answer.status);
        error.status = answer.status;
        error.code = body && body.code;
        throw error;
      }
      return body;
    }

    /** A stream token with at least 15 s left (fresh when forced), re-minted before it expires. */
    async streamToken(force = false) {
      if (!force && this.token && this.tokenExpires - Date.now() > 15000) return this.token;
      const { token, expires_at: expiresAt } = await this.api("/v1/stream-tokens", { method: "POST" });
      this.token = token;
      this.tokenExpires = Date.parse(expiresAt);
      clearTimeout(this.tokenTimer);
      const life = Math.max(5000, (this.tokenExpires - Date.now()) * 0.75);
      this.tokenTimer = setTimeout(() => {
        if (!this.closed) this.streamToken(true).catch(() => { /* the next connect mints one */ });
      }, life);
      return token;
    }

    follow(name, path, handlers) {
      const stream = new Stream(this, name, path, handlers);
      this.streams.push(stream);
      stream.open(false);
      return stream;
    }

    close() {
      this.closed = true;
      this.forget();
      clearTimeout(this.tokenTimer);
      for (const stream of this.streams) stream.close();
      this.streams = [];
    }

    trouble(name, text) {
      if (text) this.problems.add(name); else this.problems.delete(name);
      if (this.closed) return;
      if (this.problems.size) setStatus("reconnecting", "Reconnecting… " + (text || "(" + [...this.problems].join(", ") + ")"));
      else setStatus("live", "Live");
    }
  }

  /** One EventSource that reconnects by itself: a fresh token each time, resuming after its last id. */
  class Stream {
    constructor(session, name, path, handlers) {
      this.session = session;
      this.name = name;
      this.path = path; // a function of the last id: the URL path and query, without the token
      this.handlers = handlers;
      this.lastId = null;
      this.source = null;
      this.retryMs = 500;
      this.timer = null;
      this.closed = false;
    }

    async open(force) {
      if (this.closed) return;
      let token;
      try {
        token = await this.session.streamToken(force);
      } catch (error) {
        if (error.status === 401 || error.status === 403) { fatal(error); return; }
        this.retry("server unreachable");
        return;
      }
      if (this.closed) return;
      const path = this.path(this.lastId);
      const url = path + (path.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(token);
      const source = new EventSource(url);
      this.source = source;
      const receive = (kind) => (message) => {
        if (message.lastEventId) this.lastId = message.lastEventId;
        this.retryMs = 500;
        this.session.trouble(this.name, null);
        const handler = this.handlers[kind];
        if (handler) handler(parseJSON(message.data));
      };
      source.onopen = () => { this.retryMs = 500; this.session.trouble(this.name, null); };
      source.onmessage = receive("message");
      source.addEventListener("snapshot", receive("snapshot"));
      source.addEventListener("stats", receive("stats"));
      source.addEventListener("refused", (message) => {
        const problem = parseJSON(message.data);
        source.close();
        this.retry(problem.detail || "refused", (problem.retry_after || 1) * 1000);
      });
      let opened = false;
      source.addEventListener("open", () => { opened = true; });
      source.onerror = async () => {
        if (this.source !== source) return;
        source.close(); // we come back ourselves, with a fresh token and our own resume point
        const refusal = opened ? null : await refusalOf(url);
        if (this.closed || this.source !== source) return;
        if (refusal) {
          this.closed = true;
          this.session.trouble(this.name, null);
          if (this.handlers.refused) this.handlers.refused(refusal); else fatal(refusal);
          return;
        }
        this.retry("the stream was cut");
      };
    }

    retry(why, delayMs) {
      if (this.closed) return;
      if (this.source) { this.source.close(); this.source = null; }
      this.session.trouble(this.name, why);
      const wait = delayMs || this.retryMs;
      this.retryMs = Math.min(this.retryMs * 2, 3000);
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.open(true), wait);
    }

    close() {
      this.closed = true;
      clearTimeout(this.timer);
      if (this.source) this.source.close();
    }
  }

  /** Why a stream that never opened was answered with an error for good (401, 403, 404, 400), if it was:
   * EventSource does not tell, so the same URL (it carries a stream token, never the key) is asked once
   * with fetch. Anything else (unreachable, 5xx, 429) is worth retrying: null. */
  async function refusalOf(url) {
    const abort = new AbortController();
    try {
      const answer = await fetch(url, { cache: "no-store", signal: abort.signal });
      if (answer.ok || answer.status === 429 || answer.status >= 500) return null;
      let body = null;
      try { body = await answer.json(); } catch (error) { body = null; }
      const error = new Error((body && body.detail) || "HTTP " + answer.status);
      error.status = answer.status;
      error.code = body && body.code;
      return error;
    } catch (error) {
      return null;
    } finally {
      abort.abort();
    }
  }

  // ---------------------------------------------------------------- totals (dashboard stream)
  const FOLLOW_ON = new Set(["SettlementReceived", "DepositCredited", "ChainTxClaimed", "ReservationExpired"]);
  const WINDOW_S = 300;
  let stats = null;
  let counted = null; // {events, commands} at the last frame
  let buckets = new Map(); // second -> {events, commands}

  function totalsOf(events) {
    let all = 0n; let commands = 0n;
    for (const [type, count] of Object.entries(events || {})) {
      all += BigInt(count);
      if (!FOLLOW_ON.has(type)) commands += BigInt(count);
    }
    return { events: all, commands };
  }

  function onSnapshot(frame) {
    stats = frame.stats;
    counted = totalsOf(stats.events);
    renderTotals(frame.position);
    startFeed(frame.position);
  }

  function onStats(frame) {
    if (!stats) return;
    for (const [section, value] of Object.entries(frame.stats)) {
      if (value && typeof value === "object" && !Array.isArray(value)) stats[section] = { ...(stats[section] || {}), ...value };
      else stats[section] = value;
    }
    const now = totalsOf(stats.events);
    const second = Math.floor(Date.now() / 1000);
    const bucket = buckets.get(second) || { events: 0, commands: 0 };
    bucket.events += Number(now.events - counted.events);
    bucket.commands += Number(now.commands - counted.commands);
    buckets.set(second, bucket);
    counted = now;
    renderTotals(frame.position);
    drawChart();
  }

  function renderTotals(position) {
    const body = $("totals-body");
    const rows = [];
    for (const [currency, f] of Object.entries(stats.currencies || {})) {
      const balance = BigInt(f.credited || 0) - BigInt(f.debited || 0);
      const locked = BigInt(f.locked || 0);
      const reserved = BigInt(f.reserved || 0);
      const available = balance - locked - reserved;
      const money = (v) => el("td", { class: "num" }, formatMoney(v, currency));
      rows.push(el("tr", { "data-currency": currency }, el("td", {}, currency), el("td", { class: "num" }, String(f.wallets || 0)),
        money(balance), money(available), money(locked), money(reserved)));
    }
    body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "6", class: "empty" }, "no wallets yet"))]));
    $("stats-position").textContent = "as of log position " + position;
  }

  // ---------------------------------------------------------------- chart
  function drawChart() {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 640;
    const height = canvas.clientHeight || 180;
    if (canvas.width !== Math.round(width * ratio)) { canvas.width = Math.round(width * ratio); canvas.height = Math.round(height * ratio); }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const now = Math.floor(Date.now() / 1000);
    for (const second of buckets.keys()) if (second <= now - WINDOW_S) buckets.delete(second);
    const series = { events: [], commands: [] };
    let top = 4; // so that the axis counts whole events
    for (let s = now - WINDOW_S + 1; s <= now; s += 1) {
      const b = buckets.get(s) || { events: 0, commands: 0 };
      series.events.push(b.events); series.commands.push(b.commands);
      top = Math.max(top, b.events, b.commands);
    }
    top = niceCeiling(top);
    const left = 44; const right = 8; const topPad = 8; const bottom = 20;
    const plotW = width - left - right; const plotH = height - topPad - bottom;
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#6b7280"; g.strokeStyle = "#e3e6eb"; g.lineWidth = 1;
    for (let i = 0; i <= 4; i += 1) {
      const y = topPad + plotH - (plotH * i) / 4;
      g.beginPath(); g.moveTo(left, y + 0.5); g.lineTo(width - right, y + 0.5); g.stroke();
      g.textAlign = "right"; g.textBaseline = "middle";
      g.fillText(String((top * i) / 4), left - 6, y);
    }
    g.textAlign = "center"; g.textBaseline = "top";
    for (let m = 5; m >= 0; m -= 1) {
      const x = left + plotW - (plotW * m * 60) / WINDOW_S;
      g.fillText(m === 0 ? "now" : "-" + m + " min", Math.min(Math.max(x, left + 14), width - right - 14), topPad + plotH + 4);
    }
    const line = (values, color, width) => {
      g.strokeStyle = color; g.lineWidth = width; g.beginPath();
      values.forEach((v, i) => {
        const x = left + (plotW * i) / (values.length - 1);
        const y = topPad + plotH - (plotH * v) / top;
        if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
      });
      g.stroke();
    };
    g.fillStyle = "rgba(47, 111, 222, 0.12)"; // the events' area, so that one busy second shows
    g.beginPath(); g.moveTo(left, topPad + plotH);
    series.events.forEach((v, i) => g.lineTo(left + (plotW * i) / (series.events.length - 1), topPad + plotH - (plotH * v) / top));
    g.lineTo(left + plotW, topPad + plotH); g.closePath(); g.fill();
    line(series.events, "#2f6fde", 3); // under commands, wider: both show where they coincide
    line(series.commands, "#e0812f", 1.5);
    const minute = (values) => values.slice(-60).reduce((a, b) => a + b, 0);
    $("events-minute").textContent = String(minute(series.events));
    $("commands-minute").textContent = String(minute(series.commands));
    // "now": the last complete second
    $("events-now").textContent = String(series.events[series.events.length - 2] || 0);
    $("commands-now").textContent = String(series.commands[series.commands.length - 2] || 0);
  }

  function niceCeiling(value) {
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 4, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  // ---------------------------------------------------------------- projections (/health/ready)
  async function pollReady() {
    try {
      const answer = await fetch("/health/ready", { cache: "no-store" });
      const body = await answer.json();
      const projections = (body.checks && body.checks.projections) || {};
      const rows = Object.entries(projections).map(([name, p]) => el("tr", {},
        el("td", {}, name), el("td", { class: "state-" + p.state }, p.state),
        el("td", {}, String(p.lag_events)), el("td", {}, p.lag_s == null ? "–" : Number(p.lag_s).toFixed(1))));
      if (rows.length) $("projections-body").replaceChildren(...rows);
      $("ready-note").textContent = answer.ok ? "server ready" : "server not ready: " + (body.detail || answer.status);
    } catch (error) {
      $("ready-note").textContent = "server unreachable";
    }
  }

  // ---------------------------------------------------------------- currencies of streams (for amounts)
  const currencies = new Map(); // stream id -> currency, or a promise of it

  function resourceOf(streamId) { // what the API answers a stream's currency with, if anything
    for (const [prefix, path] of [["wallet-", "/v1/wallets/"], ["deposit-", "/v1/deposits/"]]) {
      if (streamId.startsWith(prefix)) return path + encodeURIComponent(streamId.slice(prefix.length));
    }
    return null;
  }

  function currencyOf(streamId) {
    const known = currencies.get(streamId);
    if (typeof known === "string") return known;
    const resource = resourceOf(streamId);
    if (!known && session && resource) {
      const lookup = session.api(resource)
        .then((found) => { currencies.set(streamId, found.currency); renderFeed(); })
        .catch(() => currencies.set(streamId, "?"));
      currencies.set(streamId, lookup);
    }
    return null;
  }

  // ---------------------------------------------------------------- event feed
  const FEED_KEEP = 500;
  const FEED_SHOW = 100;
  let feed = [];
  let feedStream = null;
  const seenTypes = new Set();

  function startFeed(position) {
    if (feedStream || !session) return;
    const start = Math.max(0, Number(position) - 50);
    feedStream = session.follow("events", (last) => "/v1/streams/events?after=" + (last || start), {
      message: onEvent,
      refused: (error) => $("feed-body").replaceChildren(el("tr", {}, el("td", { colspan: "5", class: "error-text" },
        "The event feed was refused: " + error.message))),
    });
  }

  function onEvent(event) {
    if (!event.type) return; // an id-only checkpoint
    if (event.data && typeof event.data.currency === "string") { // a wallet's or a deposit's first event
      currencies.set(event.stream_id, event.data.currency);
    }
    feed.push(event);
    if (feed.length > FEED_KEEP) feed = feed.slice(feed.length - FEED_KEEP);
    if (!seenTypes.has(event.type)) {
      seenTypes.add(event.type);
      const select = $("feed-type");
      const options = [...seenTypes].sort().map((t) => el("option", { value: t }, t));
      const chosen = select.value;
      select.replaceChildren(el("option", { value: "" }, "all types"), ...options);
      select.value = chosen;
    }
    scheduleFeed();
  }

  let feedQueued = false;
  function scheduleFeed() {
    if (feedQueued) return;
    feedQueued = true;
    requestAnimationFrame(() => { feedQueued = false; renderFeed(); });
  }

  function renderFeed() {
    const type = $("feed-type").value;
    const wallet = $("feed-wallet").value.trim().toLowerCase();
    const rows = [];
    for (let i = feed.length - 1; i >= 0 && rows.length < FEED_SHOW; i -= 1) {
      const e = feed[i];
      if (type && e.type !== type) continue;
      if (wallet && !e.stream_id.toLowerCase().includes(wallet)
          && !JSON.stringify(e.data || {}).toLowerCase().includes(wallet)) continue;
      rows.push(el("tr", {}, el("td", { class: "num" }, String(e.position)),
        el("td", {}, (e.recorded_at || "").replace("T", " ").slice(0, 19)),
        el("td", {}, e.type), el("td", { class: "mono" }, e.stream_id), el("td", { class: "num" }, amountOf(e))));
    }
    $("feed-body").replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { colspan: "5", class: "empty" }, feed.length ? "no event matches the filters" : "no events yet"))]));
  }

  function amountOf(event) {
    const data = event.data || {};
    if (data.amount === undefined || data.amount === null) return "";
    const currency = data.currency || currencyOf(event.stream_id);
    return currency && currency !== "?" ? formatMoney(data.amount, currency) + " " + currency : String(data.amount) + " (minor units)";
  }

  // ---------------------------------------------------------------- one wallet
  let walletStream = null;

  async function showWallet() {
    const id = $("wallet-id").value.trim();
    const view = $("wallet-view");
    if (!session) { view.textContent = "Connect with an API key first."; return; }
    if (!/^[0-9a-fA-F-]{32,36}$/.test(id)) { view.replaceChildren(el("span", { class: "error-text" }, "not a wallet id (a UUID)")); return; }
    if (walletStream) { walletStream.close(); walletStream = null; }
    let wallet;
    try {
      wallet = await session.api("/v1/wallets/" + encodeURIComponent(id));
    } catch (error) {
      view.replaceChildren(el("span", { class: "error-text" }, error.message));
      return;
    }
    currencies.set("wallet-" + wallet.wallet_id, wallet.currency);
    const figure = (name, label) => el("div", { class: "figure", id: "wallet-" + name },
      el("div", { class: "label" }, label), el("div", { class: "value" }, ""));
    view.className = "";
    view.replaceChildren(
      el("div", {}, el("span", { class: "mono" }, wallet.wallet_id), " · owner ", el("bdi", {}, wallet.owner), " · ", wallet.currency,
        " · version ", el("span", { id: "wallet-version" }, String(wallet.version))),
      el("div", { class: "figures" }, figure("balance", "Balance"), figure("available", "Available"),
        figure("locked", "Locked"), figure("reserved", "Reserved")),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Position"), el("th", {}, "Type"), el("th", {}, "Amount"))),
        el("tbody", { id: "wallet-events" })));
    renderWallet(wallet, wallet.currency);
    const events = [];
    walletStream = session.follow("wallet", (last) => "/v1/streams/wallets/" + encodeURIComponent(wallet.wallet_id)
      + (last ? "?after=" + last : ""), {
      message: (event) => {
        if (!event.type || !event.wallet) return;
        if (BigInt(event.wallet.version) >= BigInt($("wallet-version").textContent)) renderWallet(event.wallet, wallet.currency);
        events.push(event);
        const rows = events.slice(-15).reverse().map((e) => el("tr", {}, el("td", { class: "num" }, String(e.position)),
          el("td", {}, e.type), el("td", { class: "num" }, e.data && e.data.amount != null ? formatMoney(e.data.amount, wallet.currency) : "")));
        $("wallet-events").replaceChildren(...rows);
      },
      refused: (error) => view.append(el("p", { class: "error-text" }, "Live updates refused: " + error.message)),
    });
  }

  function renderWallet(figures, currency) {
    for (const name of ["balance", "available", "locked", "reserved"]) {
      const box = $("wallet-" + name);
      const text = formatMoney(figures[name], currency) + " " + currency;
      const value = box.querySelector(".value");
      if (value.textContent !== text) {
        value.textContent = text;
        box.classList.add("flash");
        setTimeout(() => box.classList.remove("flash"), 400);
      }
    }
    $("wallet-version").textContent = String(figures.version);
  }

  // ---------------------------------------------------------------- connect / disconnect
  let session = null;
  let timers = [];

  function fatal(error) {
    setStatus("error", error.status === 401 ? "The API key was refused"
      : error.status === 403 ? "This API key may not follow the dashboard: " + error.message
        : "Error: " + error.message);
    disconnect(false);
  }

  async function connect() {
    const input = $("api-key");
    const key = input.value.trim();
    if (!key) { setStatus("error", "Paste an API key first"); return; }
    input.value = ""; // the key stays in the session's closure only
    disconnect(false);
    const current = new Session(key);
    session = current;
    setStatus("idle", "Connecting…");
    try {
      await current.streamToken(true); // checks the key
    } catch (error) {
      if (session !== current) return;
      if (error.status) { fatal(error); return; }
      setStatus("error", "The server cannot be reached");
      disconnect(false);
      return;
    }
    if (session !== current) return;
    setStatus("live", "Live");
    $("connect").hidden = true;
    $("disconnect").hidden = false;
    current.follow("dashboard", () => "/v1/streams/dashboard", { snapshot: onSnapshot, stats: onStats });
    pollReady();
    timers.push(setInterval(pollReady, 2000));
  }

  function disconnect(announce = true) {
    if (session) session.close();
    session = null;
    feedStream = null;
    walletStream = null;
    stats = null;
    for (const timer of timers) clearInterval(timer);
    timers = [];
    $("connect").hidden = false;
    $("disconnect").hidden = true;
    if (announce) setStatus("idle", "Not connected");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("connect").addEventListener("click", connect);
    $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
    $("disconnect").addEventListener("click", () => disconnect(true));
    $("wallet-show").addEventListener("click", showWallet);
    $("wallet-id").addEventListener("keydown", (e) => { if (e.key === "Enter") showWallet(); });
    $("feed-type").addEventListener("change", renderFeed);
    $("feed-wallet").addEventListener("input", renderFeed);
    setInterval(drawChart, 1000);
    drawChart();
  });
})();
