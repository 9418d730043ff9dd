// pygirder dashboard: renders the grid's snapshots from the server-sent event stream.
// Plain DOM, no libraries, nothing from the network: every value from the grid is
// inserted as text (never as HTML), because call arguments and results are user data.
(() => {
  "use strict";

  // -- the token: taken from ?token= once, then kept out of the address bar ----------
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) {
    params.delete("token");
    const rest = params.toString();
    window.history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  const withToken = (path) =>
    token ? path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : path;

  async function getJSON(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = { error: response.status + " " + response.statusText };
    }
    if (!response.ok) {
      const err = new Error((body && body.error) || response.statusText);
      err.status = response.status;
      err.body = body;
      throw err;
    }
    return body;
  }

  // -- DOM and formatting helpers ------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "onclick") node.addEventListener("click", value);
      else if (key === "title") node.title = value;
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const svgNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const node = document.createElementNS(svgNS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    return node;
  }
  const dash = (v) => (v === null || v === undefined || v === "" ? "–" : String(v));
  const int = (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US"));
  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%");
  const shortId = (id) => (id ? id.slice(0, 12) : "–");
  const shortFn = (fn) => (fn ? fn.slice(fn.lastIndexOf(":") + 1) : "–");
  function rate(v) {
    if (v === null || v === undefined) return "–";
    return v >= 100 ? Math.round(v).toLocaleString("en-US") : v.toFixed(1);
  }
  function secs(v) {
    if (v === null || v === undefined) return "–";
    if (v < 1) return Math.round(v * 1000) + "ms";
    if (v < 60) return v.toFixed(1) + "s";
    const m = Math.floor(v / 60);
    if (m < 60) return m + "m" + String(Math.floor(v % 60)).padStart(2, "0") + "s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h" + String(m % 60).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d" + String(h % 24).padStart(2, "0") + "h";
  }
  function clock(epoch, withDate) {
    if (!epoch) return "–";
    const d = new Date(epoch * 1000);
    const t = d.toLocaleTimeString("en-GB", { hour12: false });
    if (!withDate) return t;
    return d.toISOString().slice(0, 10) + " " + t + "." + String(d.getMilliseconds()).padStart(3, "0");
  }
  const stateBadge = (state) => el("span", { class: "state state-" + (state || "unknown") }, dash(state));
  function callLink(id, label) {
    return el("a", { href: "#call=" + id, class: "call-link", title: id,
      onclick: (e) => { e.preventDefault(); showCall(id, true); } }, label || shortId(id));
  }
  function fill(tbody, rows, empty, columns) {
    tbody.replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { colspan: String(columns), class: "muted" }, empty))]));
  }

  // -- live state ------------------------------------------------------------------------
  let samples = [];
  const HISTORY_MAX = 600;

  function render(snapshot) {
    const banner = $("error");
    banner.hidden = !snapshot.error;
    banner.textContent = snapshot.error || "";
    const status = snapshot.status;
    if (!status) return;
    $("namespace").textContent = status.namespace;
    $("updated").textContent = clock(snapshot.time);
    renderCards(status);
    renderPools(status.pools);
    renderWorkers(status.workers);
    renderFailures(snapshot.failures || []);
    renderChart();
  }

  function setCard(name, value, sub, alert) {
    $("c-" + name).textContent = value;
    $("c-" + name + "-sub").textContent = sub || "";
    $("c-" + name).classList.toggle("alert", !!alert);
  }

  function renderCards(s) {
    const t = s.totals, st = s.stats, k = s.keys;
    const lookups = st.submitted + st.cached + st.shared;
    setCard("workers", String(t.alive), t.busy + " busy · " + t.idle + " idle" + (t.dead ? " · " + t.dead + " dead" : ""), t.dead > 0);
    const peak = samples.reduce((m, p) => Math.max(m, p.rate || 0), 0);
    setCard("rate", rate(s.calls_per_s), "peak " + rate(peak));
    setCard("executed", int(st.executed), int(st.submitted) + " submitted");
    setCard("queued", int(t.queued), "moved " + int(st.moved_to_pool) + " · requeued " + int(st.requeued), t.queued > 0 && t.idle === 0 && t.alive === 0);
    setCard("cache", pct(s.rates.cache_hit), int(st.cached) + " of " + int(lookups) + " lookups");
    setCard("sharing", pct(s.rates.sharing), int(st.shared) + " joined a running call");
    setCard("results", (k.complete ? "" : "≥ ") + int(k.results), int(k.pending) + " pending · " + int(k.calls) + " call records");
    setCard("failed", int(st.failed), st.executed ? pct(s.rates.failure) + " of executed" : "", st.failed > 0);
  }

  function renderPools(pools) {
    const rows = pools.map((p) => {
      const load = p.alive ? p.busy / p.alive : 0;
      const bar = el("div", { class: "bar", title: p.busy + " of " + p.alive + " busy" }, el("div", { class: "fill" }));
      bar.firstChild.style.width = Math.round(100 * load) + "%";
      return el("tr", {},
        el("td", {}, p.name),
        el("td", { class: "num" }, p.alive + (p.dead ? " (+" + p.dead + " dead)" : "")),
        el("td", { class: "load" }, bar, el("span", { class: "muted" }, " " + Math.round(100 * load) + "%")),
        el("td", { class: "num" + (p.queued && !p.idle ? " warn" : "") }, int(p.queued)));
    });
    fill($("pools").tBodies[0], rows, "no pools: no worker has registered in this namespace", 4);
  }

  function renderWorkers(workers) {
    $("workers-count").textContent = workers.length ? "(" + workers.length + ")" : "";
    const rows = workers.map((w) => el("tr", { class: "worker-" + w.state },
      el("td", { class: "mono", title: w.id }, w.id),
      el("td", {}, dash(w.host)),
      el("td", { class: "num" }, dash(w.pid)),
      el("td", {}, w.pool),
      el("td", {}, stateBadge(w.state)),
      el("td", {}, w.current ? [callLink(w.current, shortId(w.current)), " ", el("span", { class: "muted" }, shortFn(w.current_fn))] : "–"),
      el("td", { class: "num" }, dash(w.calls_done)),
      el("td", { class: "num", title: "requests on its stack or in flight" }, String(w.in_flight + w.owned)),
      el("td", { class: "num" }, secs(w.uptime_s))));
    fill($("workers").tBodies[0], rows, "no workers registered", 9);
  }

  function renderFailures(failures) {
    const rows = failures.map((f) => el("tr", { class: "clickable", title: "inspect " + f.id,
      onclick: () => showCall(f.id, true) },
      el("td", { class: "nowrap" }, clock(f.finished)),
      el("td", {}, shortFn(f.fn)),
      el("td", { class: "error-text" }, dash(f.summary))));
    fill($("failures").tBodies[0], rows, "no failures seen", 3);
  }

  // -- throughput chart (inline SVG) -------------------------------------------------
  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function renderChart() {
    const box = $("chart");
    const W = Math.max(300, box.clientWidth || 600), H = 180;
    const pad = { l: 44, r: 44, t: 10, b: 22 };
    const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
    const points = samples.filter((p) => p.t);
    const now = points.length ? points[points.length - 1].t : Date.now() / 1000;
    const span = Math.max(30, Math.min(300, points.length ? now - points[0].t : 30));
    const t0 = now - span;
    const shown = points.filter((p) => p.t >= t0);
    const maxRate = niceMax(Math.max(0, ...shown.map((p) => p.rate || 0)));
    const maxQueue = niceMax(Math.max(0, ...shown.map((p) => p.queued || 0)));
    const x = (t) => pad.l + ((t - t0) / span) * (W - pad.l - pad.r);
    const y = (v, max) => H - pad.b - (v / max) * (H - pad.t - pad.b);

    for (let i = 0; i <= 4; i++) {
      const v = (maxRate * i) / 4, yy = y(v, maxRate);
      root.append(svg("line", { x1: pad.l, x2: W - pad.r, y1: yy, y2: yy, class: "grid" }));
      const label = svg("text", { x: pad.l - 6, y: yy + 4, class: "axis", "text-anchor": "end" });
      label.textContent = rate(v);
      root.append(label);
    }
    const qLabel = svg("text", { x: W - pad.r + 6, y: pad.t + 8, class: "axis queue-axis" });
    qLabel.textContent = "q " + int(maxQueue);
    root.append(qLabel);
    for (const [t, text] of [[t0, "-" + secs(span)], [now, "now"]]) {
      const label = svg("text", { x: x(t), y: H - 6, class: "axis", "text-anchor": t === now ? "end" : "start" });
      label.textContent = text;
      root.append(label);
    }
    const rated = shown.filter((p) => p.rate !== null && p.rate !== undefined);
    if (rated.length > 1) {
      const line = rated.map((p, i) => (i ? "L" : "M") + x(p.t).toFixed(1) + " " + y(p.rate, maxRate).toFixed(1)).join(" ");
      const area = line + ` L${x(rated[rated.length - 1].t).toFixed(1)} ${y(0, maxRate)} L${x(rated[0].t).toFixed(1)} ${y(0, maxRate)} Z`;
      root.append(svg("path", { d: area, class: "rate-area" }));
      root.append(svg("path", { d: line, class: "rate-line" }));
    }
    if (shown.length > 1) {
      const q = shown.map((p, i) => (i ? "L" : "M") + x(p.t).toFixed(1) + " " + y(p.queued || 0, maxQueue).toFixed(1)).join(" ");
      root.append(svg("path", { d: q, class: "queue-line" }));
    }
    box.replaceChildren(root);
    const last = rated.length ? rated[rated.length - 1].rate : null;
    $("chart-legend").textContent = "calls/s " + rate(last) + " · dashed: queue depth";
  }

  // -- call explorer -----------------------------------------------------------------------
  const backStack = [];
  let shownCall = null;
  let refreshTimer = null;

  async function showCall(id, push) {
    id = String(id || "").trim();
    if (!id) return;
    if (push && shownCall && shownCall !== id) backStack.push(shownCall);
    $("explore-back").disabled = backStack.length === 0;
    $("explore-id").value = id;
    clearTimeout(refreshTimer);
    const target = $("call");
    if (shownCall !== id) target.replaceChildren(el("p", { class: "muted" }, "loading " + id + "…"));
    let info;
    try {
      info = await getJSON("api/calls/" + encodeURIComponent(id));
    } catch (err) {
      const matches = (err.body && err.body.matches) || [];
      target.replaceChildren(el("p", { class: "error-text" }, err.message),
        matches.length ? el("ul", {}, matches.map((m) => el("li", {}, callLink(m, m)))) : null);
      shownCall = null;
      return;
    }
    shownCall = info.id;
    if (location.hash !== "#call=" + info.id) window.history.replaceState(null, "", "#call=" + info.id);
    target.replaceChildren(renderCall(info));
    if (info.state !== "done" && info.state !== "failed") {
      refreshTimer = setTimeout(() => { if (shownCall === info.id) showCall(info.id, false); }, 2000);
    }
  }

  function renderCall(c) {
    const fields = el("dl", { class: "fields" });
    const add = (name, ...value) => fields.append(el("dt", {}, name), el("dd", {}, ...value));
    add("id", el("span", { class: "mono" }, c.id));
    add("state", stateBadge(c.state), c.attempts > 1 ? " (attempt " + c.attempts + ")" : "");
    add("pool / worker", dash(c.pool) + " / " + dash(c.worker));
    add("submitted", clock(c.submitted, true));
    add("started", clock(c.started, true), el("span", { class: "muted" }, "  queued " + secs(c.queued_s)));
    add("finished", clock(c.finished, true), el("span", { class: "muted" }, "  ran " + secs(c.duration_s)));
    if (c.state === "failed") add("error", el("span", { class: "error-text" }, dash(c.summary)));
    else add("result", el("span", { class: "mono" }, dash(c.summary)));
    const crumbs = c.ancestors.length
      ? [c.ancestors_truncated ? "… › " : "", ...c.ancestors.flatMap((a, i) => [i ? " › " : "", callLink(a.id, shortFn(a.fn) + " " + shortId(a.id).slice(0, 8))])]
      : [el("span", { class: "muted" }, "a client (top-level call)")];
    add("called from", ...crumbs);
    const parts = [
      el("h3", {}, el("span", { class: "fn" }, dash(c.fn)), el("span", { class: "args mono" }, " " + dash(c.args))),
      fields,
    ];
    if (!c.record) parts.push(el("p", { class: "muted" }, "Its call record has expired: only its result or pending state is left."));
    const error = c.result && c.result.error;
    if (error && error.traceback) {
      parts.push(el("details", {}, el("summary", {}, "remote traceback"), el("pre", { class: "traceback" }, error.traceback)));
    }
    if (c.children_total) {
      const rows = c.children.map((k) => el("tr", { class: "clickable", title: "inspect " + k.id, onclick: () => showCall(k.id, true) },
        el("td", {}, callLink(k.id, k.id.slice(0, 8))),
        el("td", {}, shortFn(k.fn)),
        el("td", { class: "mono" }, dash(k.args)),
        el("td", {}, stateBadge(k.missing ? "expired" : k.state)),
        el("td", { class: "num" }, secs(k.duration_s)),
        el("td", { class: "mono" + (k.state === "failed" ? " error-text" : "") }, dash(k.summary))));
      const more = c.children_total > c.children.length ? " (" + c.children.length + " of " + c.children_total + " shown)" : " (" + c.children_total + ")";
      parts.push(el("h4", {}, "Children" + more),
        el("table", { class: "children" },
          el("thead", {}, el("tr", {}, ["call", "function", "arguments", "state", "duration", "result"].map((h) => el("th", { class: h === "duration" ? "num" : "" }, h)))),
          el("tbody", {}, rows)));
    } else {
      parts.push(el("p", { class: "muted" }, "No children: this call made no grid calls."));
    }
    return el("div", { class: "call-view" }, parts);
  }

  $("explore-form").addEventListener("submit", (e) => {
    e.preventDefault();
    showCall($("explore-id").value, true);
  });
  $("explore-back").addEventListener("click", () => {
    const id = backStack.pop();
    $("explore-back").disabled = backStack.length === 0;
    if (id) showCall(id, false);
  });
  window.addEventListener("hashchange", () => {
    const m = location.hash.match(/^#call=([0-9a-fA-F]+)/);
    if (m && m[1] !== shownCall) showCall(m[1], true);
  });

  // -- fleet -----------------------------------------------------------------------------
  const FLEET_COLUMNS = ["id", "state", "type", "zone", "private_ip", "public_ip", "launched", "expires"];
  async function loadFleet() {
    const target = $("fleet");
    let fleet;
    try {
      fleet = await getJSON("api/fleet");
    } catch (err) {
      target.replaceChildren(el("p", { class: "error-text" }, "cannot list the fleet: " + err.message));
      return;
    }
    if (!fleet.configured) {
      $("fleet-summary").textContent = "";
      target.replaceChildren(el("p", { class: "muted" }, "No fleet configured: this grid's machines are not managed by pygirder cloud."));
      return;
    }
    const roles = Object.entries(fleet.roles || {}).sort();
    $("fleet-summary").textContent = roles.map(([r, n]) => n + " " + r).join(" · ");
    const parts = [];
    if (fleet.error) parts.push(el("p", { class: "error-text" }, fleet.error));
    for (const [role] of roles) {
      const members = fleet.instances.filter((i) => String(i.role || "unknown") === role);
      parts.push(el("h4", {}, role + " (" + members.length + ")"),
        el("table", { class: "fleet" },
          el("thead", {}, el("tr", {}, FLEET_COLUMNS.map((c) => el("th", {}, c.replace("_", " "))))),
          el("tbody", {}, members.map((i) => el("tr", {}, FLEET_COLUMNS.map((c) => el("td", { class: c === "id" ? "mono" : "" }, dash(i[c]))))))));
    }
    if (!roles.length && !fleet.error) parts.push(el("p", { class: "muted" }, "The fleet has no instances."));
    target.replaceChildren(...parts);
  }

  // -- the event stream ---------------------------------------------------------------------
  function setConn(state, text) {
    const c = $("conn");
    c.className = "conn " + state;
    c.textContent = text;
  }

  function connect() {
    const source = new EventSource(withToken("api/events"));
    source.addEventListener("open", () => setConn("live", "live"));
    source.addEventListener("snapshot", (e) => {
      const snap = JSON.parse(e.data);
      samples = (snap.history || []).slice(-HISTORY_MAX);
      render(snap);
    });
    source.addEventListener("status", (e) => {
      const snap = JSON.parse(e.data);
      const p = snap.point;
      if (p && (!samples.length || p.t > samples[samples.length - 1].t)) {
        samples.push(p);
        if (samples.length > HISTORY_MAX) samples.shift();
      }
      render(snap);
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        setConn("down", "disconnected");
        getJSON("api/status").catch((err) => {
          const banner = $("error");
          banner.hidden = false;
          banner.textContent = err.status === 401 || err.status === 403
            ? "Not authorized: open the URL that `pygirder dashboard` printed (with its ?token=)."
            : "Lost the dashboard server: " + err.message;
        });
        setTimeout(connect, 3000);
      } else {
        setConn("connecting", "reconnecting");
      }
    });
  }

  window.addEventListener("resize", () => renderChart());
  connect();
  loadFleet();
  setInterval(loadFleet, 30000);
  const m = location.hash.match(/^#call=([0-9a-fA-F]+)/);
  if (m) showCall(m[1], false);
})();
