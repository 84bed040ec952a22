/* neuroproj-prune report page. Reads the JSON embedded in #npp-data (see neuroproj_prune/view.py) and
   builds every section with plotly.js (embedded in the page). No network, no server. */
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("npp-data").textContent);
  const app = document.getElementById("app");
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
    "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];
  const NOISE = "#9e9e9e";
  const ROLE = [
    { name: "kept", sym: "circle", sym2: "circle", size3: 4.5, size2: 7, glyph: "●" },
    { name: "removed (folded)", sym: "x", sym2: "x-thin-open", size3: 4, size2: 7, glyph: "×" },
    { name: "kept representative", sym: "diamond", sym2: "diamond", size3: 7, size2: 10, glyph: "◆" },
  ];
  // a layer the plan removes whole (drop_layers): every point removed, nothing folded
  const ROLE_DROPPED = { name: "removed (layer removed whole)", sym: "x", sym2: "x-thin-open", size3: 4, size2: 7 };
  const HEAD_SITE = "attn.heads";
  const PCFG = { displaylogo: false, responsive: true };

  // ------------------------------------------------------------------------------------ decoding
  let F16 = null;
  function f16Table() {
    F16 = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
      F16[h] = e === 0 ? s * Math.pow(2, -14) * (f / 1024) : e === 31 ? (f ? NaN : s * Infinity)
        : s * Math.pow(2, e - 15) * (1 + f / 1024);
    }
  }
  function bytes(b64) {
    const bin = atob(b64), u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    return u;
  }
  function arr(d) {
    if (!d) return null;
    if (d._v) return d._v;
    const u = bytes(d.b64);
    let v;
    switch (d.dtype) {
      case "f2": {
        if (!F16) f16Table();
        const h = new Uint16Array(u.buffer);
        v = new Float32Array(h.length);
        for (let i = 0; i < h.length; i++) v[i] = F16[h[i]];
        break;
      }
      case "f4": v = new Float32Array(u.buffer); break;
      case "i4": v = new Int32Array(u.buffer); break;
      case "i2": v = new Int16Array(u.buffer); break;
      case "i1": v = new Int8Array(u.buffer); break;
      default: v = u;
    }
    Object.defineProperty(d, "_v", { value: v, enumerable: false });
    return v;
  }

  // ------------------------------------------------------------------------------------- helpers
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") {
      if (Number.isInteger(v)) return Math.abs(v) >= 10000 ? v.toLocaleString("en-US") : String(v);
      if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(3);
      return String(+v.toPrecision(5));
    }
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function section(id, title) {
    const s = el("section", { id: id }, el("h2", { text: title }));
    app.append(s);
    nav.append(el("a", { href: "#" + id, text: title }));
    return s;
  }
  function kvTable(obj) {
    const t = el("table", { class: "kv" });
    for (const [k, v] of Object.entries(obj)) {
      if (v !== null && typeof v === "object") continue;
      t.append(el("tr", {}, el("td", { text: k }), el("td", { text: fmt(v) })));
    }
    return t;
  }
  /* A table whose columns sort on a click (numbers numerically, empty cells last). */
  function sortableTable(columns, rows, id) {
    const t = el("table", { class: "sortable" });
    if (id) t.id = id;
    const thead = el("thead"), tbody = el("tbody"), tr = el("tr");
    const numeric = columns.map((c) => rows.some((r) => typeof r[c] === "number") &&
      rows.every((r) => r[c] === null || r[c] === undefined || r[c] === "" || typeof r[c] === "number"));
    columns.forEach((c, ci) => {
      const th = el("th", { text: c, class: numeric[ci] ? "" : "s", "data-col": c });
      th.addEventListener("click", () => {
        const asc = !th.classList.contains("asc");
        tr.querySelectorAll("th").forEach((x) => x.classList.remove("asc", "desc"));
        th.classList.add(asc ? "asc" : "desc");
        const sorted = rows.slice().sort((a, b) => {
          const x = a[c], y = b[c], ex = x === null || x === undefined || x === "", ey = y === null || y === undefined || y === "";
          if (ex || ey) return ex === ey ? 0 : ex ? 1 : -1;
          const r = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
          return asc ? r : -r;
        });
        fill(sorted);
      });
      tr.append(th);
    });
    thead.append(tr);
    function fill(rs) {
      tbody.textContent = "";
      for (const r of rs) {
        const row = el("tr");
        columns.forEach((c, ci) => row.append(el("td", { text: fmt(r[c]), class: numeric[ci] ? "" : "s" })));
        tbody.append(row);
      }
    }
    fill(rows);
    t.append(thead, tbody);
    return el("div", { class: "tablewrap" }, t);
  }

  // -------------------------------------------------------------------------------------- header
  const header = el("header", {},
    el("h1", { text: "neuroproj-prune report: " + D.title }),
    el("div", { class: "sub", text: D.run_dir + " · generated " + D.created + " · files: " + D.files.join(", ") +
      (D.budget ? " · page size limit " + D.budget.max_mb + " MB (--max-mb)" : "") }));
  const nav = el("nav");
  app.textContent = "";
  app.append(header, nav);
  if (D.notes && D.notes.length) {
    const ul = el("ul");
    D.notes.forEach((n) => ul.append(el("li", { text: n })));
    app.append(el("div", { class: "notes", id: "notes" }, el("b", { text: "Reduced or missing data: " }), ul));
  }

  // ---------------------------------------------------------------------------------- projections
  const state = { site: null, layerIdx: 0, token: 0, colour: "cluster" };
  const P = D.projections;
  const TR = D.trace;
  let scatterDiv = null, tokenSpans = [], selectLayer = () => {};

  function keyOf() { return P.layers[state.layerIdx] + "/" + state.site; }
  function traceRow(key, t) {
    if (!TR || !TR.acts[key]) return null;
    const a = TR.acts[key], v = arr(a.values), W = a.W;
    const row = new Float32Array(W);
    const sc = a.scale ? arr(a.scale)[t] : 1;
    for (let j = 0; j < W; j++) row[j] = v[t * W + j] * sc;
    return row;
  }
  function activationMode(key) { return state.colour === "activation" && TR && TR.acts[key]; }
  function isDropped(layer) { return !!(P.dropped && P.dropped.indexOf(layer) >= 0); }
  /* The heads of a (layer, attn.heads) set: {hd, H, KV, row} (row: P.heads.rows' entry, with per-head energy
     and role), or null when the page has no heads' layout that fits the set (its points are then shown as any site's). */
  function headInfo(key) {
    const e = P.points[key], HS = P.heads, parts = key.split("/");
    if (!e || !HS || !HS.head_dim || parts.slice(1).join("/") !== HEAD_SITE) return null;
    const row = HS.rows.find((r) => r.layer === +parts[0]);
    if (!row || row.H * HS.head_dim !== e.N) return null;
    return { hd: HS.head_dim, H: row.H, KV: row.KV, row: row };
  }
  function headGone(hi, h) { return !!(hi.row.role && hi.row.role[h] === 1); }

  function buildTraces(key) {
    const e = P.points[key];
    const xyz = arr(e.xyz), n = e.n, M = e.M, idx = arr(e.idx);
    const cl = arr(e.cluster), role = arr(e.role), rep = arr(e.rep), en = arr(e.energy);
    const act = activationMode(key) ? traceRow(key, state.token) : null;
    const A = act ? (TR.acts[key].absmax || 1) : 1;
    const hi = headInfo(key);
    // one group per role (kept, removed, representative), or per head on the head site: {R, name, colour, gi}
    let groups;
    if (hi) {
      const g = hi.H / hi.KV;
      groups = [];
      for (let h = 0; h < hi.H; h++) {
        const gone = headGone(hi, h);
        groups.push({ items: [], gi: gone ? 1 : 0, R: gone ? (e.dropped ? ROLE_DROPPED : ROLE[1]) : ROLE[0], head: h,
          name: "head " + h + " · kv " + Math.floor(h / g) + (gone ? " · removed" : ""),
          colour: gone ? NOISE : PALETTE[h % PALETTE.length] });
      }
      for (let k = 0; k < M; k++) groups[Math.min(hi.H - 1, Math.floor((idx ? idx[k] : k) / hi.hd))].items.push(k);
    } else {
      groups = (role ? [0, 1, 2] : [0]).map((gi) => ({ items: [], gi: gi, name: null, colour: null,
        R: !role ? { name: "neurons", sym: "circle", sym2: "circle", size3: 4.5, size2: 7 }
          : gi === 1 && e.dropped ? ROLE_DROPPED : ROLE[gi] }));
      for (let k = 0; k < M; k++) groups[role ? role[k] : 0].items.push(k);
    }
    const three = n >= 3, two = n === 2;
    const traces = [];
    let first = true;
    groups.forEach((G) => {
      const g = G.items, gi = G.gi, R = G.R;
      if (!g.length) return;
      const x = [], y = [], z = [], color = [], size = [], text = [];
      for (const k of g) {
        const j = idx ? idx[k] : k;
        x.push(xyz[k * n]);
        if (three) { y.push(xyz[k * n + 1]); z.push(xyz[k * n + 2]); }
        else if (two) y.push(xyz[k * n + 1]);
        else y.push((((j * 2654435761) >>> 0) % 1000) / 500 - 1);
        const c = cl ? cl[k] : null;
        let h = hi ? "channel " + j + " · head " + G.head + " (kv " + Math.floor(G.head / (hi.H / hi.KV)) + ")"
          : "neuron " + j + "<br>cluster " + (c === null ? "–" : c < 0 ? "noise" : c);
        if (hi && c !== null) h += "<br>cluster " + (c < 0 ? "noise" : c);
        if (en) h += "<br>energy " + fmt(en[k]);
        if (e.dropped) h += "<br>removed (the plan removes layer " + P.layers[state.layerIdx] + " whole)";
        else if (hi && hi.row.role) h += G.gi === 1 ? "<br>removed (head " + G.head + " removed)" : "<br>kept";
        else if (role) {
          if (role[k] === 1) h += "<br>removed → folded into " + (rep[k] >= 0 ? rep[k] : "–");
          else if (role[k] === 2) h += "<br>kept (representative)";
          else h += "<br>kept";
        }
        if (act) {
          const a = act[k];
          h += "<br>activation " + fmt(a);
          color.push(a);
          size.push((three ? 3 : 4) + (three ? 16 : 20) * Math.abs(a) / A);
        } else {
          color.push(G.colour ? G.colour : c === null ? (role ? ["#1565c0", "#c62828", "#000000"][gi] : "#1565c0")
            : c < 0 ? NOISE : PALETTE[c % PALETTE.length]);
          size.push(three ? R.size3 : R.size2);
        }
        text.push(h);
      }
      const marker = { size: size, color: color, symbol: three ? R.sym : R.sym2, opacity: gi === 1 && (role || hi) ? 0.75 : 0.9 };
      if (gi === 2 && role) marker.line = { color: "#000", width: 1 };
      if (act) {
        Object.assign(marker, { colorscale: [[0, "#2166ac"], [0.25, "#67a9cf"], [0.5, "#d9d9d9"], [0.75, "#ef8a62"], [1, "#b2182b"]], cmin: -A, cmax: A, cmid: 0, showscale: first,
          colorbar: { title: { text: "activation" }, thickness: 14, len: 0.7 } });
        first = false;
      }
      const tr = { name: (G.name || R.name) + " (" + g.length + ")", x: x, y: y, text: text, hovertemplate: "%{text}<extra></extra>",
        mode: "markers", marker: marker, customdata: g };
      if (three) { tr.type = "scatter3d"; tr.z = z; } else tr.type = M > 4000 ? "scattergl" : "scatter";
      traces.push(tr);
    });
    return traces;
  }

  function layout(key) {
    const e = P.points[key];
    const title = "layer " + P.layers[state.layerIdx] + " · " + state.site + " · " + e.M + " of " + e.N +
      (headInfo(key) ? " channels" : " neurons") + (isDropped(P.layers[state.layerIdx]) ? " · layer removed whole" : "");
    const L = { title: { text: title, font: { size: 14 } }, margin: { l: 10, r: 10, t: 40, b: 10 }, showlegend: true,
      legend: { x: 0, y: 1 }, uirevision: state.site, hovermode: "closest" };
    if (e.n >= 3) L.scene = { xaxis: { title: { text: "p1" } }, yaxis: { title: { text: "p2" } }, zaxis: { title: { text: "p3" } }, aspectmode: "data" };
    else if (e.n === 2) { L.xaxis = { title: { text: "p1" } }; L.yaxis = { title: { text: "p2" }, scaleanchor: "x" }; L.margin = { l: 50, r: 10, t: 40, b: 40 }; }
    else { L.xaxis = { title: { text: "p1 (the 1-D ordering)" } }; L.yaxis = { visible: false, range: [-3, 3] }; L.margin = { l: 10, r: 10, t: 40, b: 40 }; }
    return L;
  }

  function updateInfo(key) {
    const e = P.points[key], info = document.getElementById("info");
    info.textContent = "";
    const rows = [["layer", P.layers[state.layerIdx]], ["site", state.site], [headInfo(key) ? "channels" : "neurons", e.N + (e.M < e.N ? " (" + e.M + " shown)" : "")],
      ["dims", e.n], ["normalised stress", e.stress]];
    if (e.n_clusters !== undefined) rows.push(["clusters", e.n_clusters]);
    const layerNo = P.layers[state.layerIdx], hi = headInfo(key);
    if (isDropped(layerNo)) rows.push(["plan", "layer removed whole (drop_layers)"]);
    const role = arr(e.role);
    if (hi) {
      const kept = hi.row.role ? hi.row.role.filter((r) => r === 0).length : hi.H;
      rows.push(["heads", hi.H + " in " + hi.KV + " key/value groups, " + hi.hd + " channels each"]);
      if (hi.row.role) rows.push(["kept / removed heads", kept + " / " + (hi.H - kept)]);
    } else if (role) {
      const c = [0, 0, 0];
      for (let k = 0; k < role.length; k++) c[role[k]]++;
      rows.push(["kept / of them representatives", (c[0] + c[2]) + " / " + c[2]], ["removed", c[1]]);
    }
    rows.push(["activation energy", e.energy ? P.energy_kind : "– (no stats.safetensors)"]);
    if (activationMode(key)) rows.push(["token", state.token + " of " + TR.tokens.length + " (" + (state.token < TR.n_prompt ? "prompt" : "generated") + ")"],
      ["max |activation| (all tokens)", TR.acts[key].absmax]);
    const t = el("table");
    rows.forEach(([k, v]) => t.append(el("tr", {}, el("td", { text: k }), el("td", { text: fmt(v) }))));
    info.append(t);
    const leg = el("div", { class: "muted" });
    leg.append(el("p", { text: (hi ? "Symbols: ● kept head · × removed head." : "Symbols: ● kept · × removed · ◆ kept representative (removed neurons folded into it).") +
      (P.role_source.length ? " Roles from " + P.role_source.join("; ") + "." : " No plan or clustering: all neurons alike.") }));
    leg.append(el("p", { text: activationMode(key) ? "Colour: activation sign (red > 0, blue < 0, scale centred at 0, fixed over all tokens); size: |activation|."
      : hi ? "Colour: head (one legend entry per head; grey × = removed head)."
      : e.cluster ? "Colour: cluster (grey = DBSCAN noise)." : "Colour: role (no clustering for this site)." }));
    info.append(leg);
    if (hi) info.append(headTable(hi));
  }

  /* The heads of the layer shown: key/value group, status and energy (shaded by the layer's largest). */
  function headTable(hi) {
    const row = hi.row, E = row.energy, g = hi.H / hi.KV;
    const top = E ? Math.max(...E.map((x) => x || 0)) || 1 : 1;
    const t = el("table", { id: "heads-table", class: "heads" });
    t.append(el("tr", {}, el("th", { text: "head" }), el("th", { text: "kv" }), el("th", { text: "status" }),
      el("th", { text: "energy" })));
    for (let h = 0; h < hi.H; h++) {
      const gone = headGone(hi, h);
      const en = el("td", { class: "num", text: E ? fmt(E[h]) : "–" });
      if (E) en.style.background = "rgba(21, 101, 192, " + (0.08 + 0.6 * Math.max(0, E[h]) / top).toFixed(3) + ")";
      const sw = el("span", { class: "swatch" });
      sw.style.background = gone ? NOISE : PALETTE[h % PALETTE.length];
      t.append(el("tr", { class: gone ? "removed" : "", "data-head": String(h) },
        el("td", {}, sw, String(h)), el("td", { text: String(Math.floor(h / g)) }),
        el("td", { text: row.role ? (gone ? (row.dropped ? "removed (layer)" : row.attention_removed ? "removed (attention)" : "removed") : "kept") : "–" }), en));
    }
    return el("div", {}, el("p", { class: "muted", text: "Heads of layer " + row.layer + (row.dropped ? " (removed whole)" : row.attention_removed ? " (its attention removed)" : "") +
      "; energy: " + P.heads.energy_kind + "." }), t);
  }

  /* The layers × heads map beside the scatter: energy (share of the layer's largest head), removed heads ×,
     layers removed whole named so on the axis; the layer shown outlined; a click shows that layer. */
  let headsMap = null;
  function drawHeadsMap() {
    const HS = P.heads;
    const rows = HS.rows, H = Math.max(...rows.map((r) => r.H));
    const hasE = rows.some((r) => r.energy);
    const z = rows.map((r) => {
      const top = r.energy ? Math.max(...r.energy) || 1 : 1;
      return Array.from({ length: H }, (_, h) => h >= r.H ? null : r.energy ? r.energy[h] / top : r.role ? 1 - r.role[h] : 1);
    });
    const text = rows.map((r) => Array.from({ length: H }, (_, h) => h >= r.H ? "" : "layer " + r.layer + " · head " + h +
      " (kv " + Math.floor(h / (r.H / r.KV)) + ")" + (r.energy ? "<br>energy " + fmt(r.energy[h]) : "") +
      (r.dropped ? "<br>layer removed whole" : r.role ? (r.role[h] === 1 ? "<br>removed" : "<br>kept") : "")));
    const gx = [], gy = [];
    rows.forEach((r) => { if (r.role) r.role.forEach((v, h) => { if (v === 1) { gx.push(h); gy.push(r.layer); } }); });
    const traces = [{ type: "heatmap", x: Array.from({ length: H }, (_, h) => h), y: rows.map((r) => r.layer), z: z, text: text,
      hovertemplate: "%{text}<extra></extra>", colorscale: "Blues", zmin: 0, zmax: 1, showscale: false, xgap: 1, ygap: 1 }];
    if (gx.length) traces.push({ type: "scatter", mode: "markers", x: gx, y: gy, name: "removed", hoverinfo: "skip",
      marker: { symbol: "x-thin-open", size: 9, color: "#c62828", line: { width: 2, color: "#c62828" } } });
    const L = { title: { text: "heads: " + (hasE ? "energy (share of the layer's largest)" : "kept / removed"), font: { size: 12 } },
      margin: { l: 70, r: 8, t: 30, b: 36 }, showlegend: false, height: Math.min(520, 90 + 16 * rows.length),
      xaxis: { title: { text: "head" }, dtick: H > 16 ? 4 : 1, range: [-0.5, H - 0.5] },
      yaxis: { autorange: "reversed", tickvals: rows.map((r) => r.layer),
        ticktext: rows.map((r) => (r.dropped ? "✕ " : "") + "layer " + r.layer), tickfont: { size: 10 } } };
    headsMap.setAttribute("data-removed", String(gx.length));
    Plotly.newPlot(headsMap, traces, L, PCFG);
    headsMap.on("plotly_click", (ev) => {
      const i = ev.points && ev.points.length ? P.layers.indexOf(ev.points[0].y) : -1;
      if (i >= 0) selectLayer(i);
    });
  }
  function markHeadsMap() {
    if (!headsMap || !headsMap.layout) return;
    const L = P.layers[state.layerIdx];
    Plotly.relayout(headsMap, { shapes: [{ type: "rect", xref: "paper", x0: 0, x1: 1, yref: "y", y0: L - 0.5, y1: L + 0.5,
      line: { color: "#e65100", width: 2 }, fillcolor: "rgba(0,0,0,0)" }] });
  }

  function update() {
    const key = keyOf();
    if (!P.points[key]) {
      Plotly.purge(scatterDiv);
      scatterDiv.textContent = "no projection for layer " + P.layers[state.layerIdx] + " / " + state.site;
      return;
    }
    markHeadsMap();
    document.getElementById("layer-label").textContent = String(P.layers[state.layerIdx]);
    document.querySelectorAll("#layer-list .lyr").forEach((b) => b.classList.toggle("cur", +b.getAttribute("data-i") === state.layerIdx));
    Plotly.react(scatterDiv, buildTraces(key), layout(key), PCFG);
    scatterDiv.setAttribute("data-key", key);
    updateInfo(key);
    const tc = document.getElementById("trace-controls");
    if (tc) {
      const has = !!TR.acts[key];
      document.getElementById("trace-missing").textContent = has ? "" : TR.layer_step > 1
        ? "(no trace for this layer: the page keeps one layer in every " + TR.layer_step + ", see the notes)"
        : "(no trace for this layer/site)";
    }
    syncHeatmap();
  }

  function highlight() {
    tokenSpans.forEach((s) => s.classList.remove("cur"));
    const s = tokenSpans[state.token];
    if (s) {
      s.classList.add("cur");
      const box = document.getElementById("tokens");
      if (box && (s.offsetTop < box.scrollTop || s.offsetTop > box.scrollTop + box.clientHeight - 20)) box.scrollTop = s.offsetTop - 20;
    }
    const lab = document.getElementById("token-label");
    if (lab && TR) lab.textContent = state.token + ": " + JSON.stringify(TR.tokens[state.token]) +
      (state.token < TR.n_prompt ? " (prompt)" : " (generated)");
  }

  if (P && P.layers.length) {
    const s = section("sec-projections", "Projections");
    state.site = P.sites.find((x) => P.points[P.layers[0] + "/" + x]) || P.sites[0];
    const siteSel = el("select", { id: "site" });
    P.sites.forEach((x) => siteSel.append(el("option", { value: x, text: x })));
    siteSel.value = state.site;
    const layer = el("input", { id: "layer", type: "range", min: "0", max: String(P.layers.length - 1), step: "1", value: "0" });
    const controls = el("div", { class: "controls" },
      el("label", {}, "site", siteSel),
      el("label", {}, "layer", layer, el("b", { id: "layer-label", text: String(P.layers[0]) }),
        el("span", { class: "muted", text: "(" + P.layers[0] + "–" + P.layers[P.layers.length - 1] + ")" })));
    s.append(el("p", { class: "muted", text: "Each neuron is a point placed so that distance ≈ 1 − correlation (" +
      (P.projection_meta.mode || "") + " projection, n = " + P.dims + "). Drag to rotate, scroll to zoom, hover for details." }));
    // what the page left out to stay within --max-mb, and how to see it all (the same text is in the notes)
    if (P.decimation) s.append(el("p", { id: "decimation", class: "warn", text: P.decimation }));
    s.append(controls);
    siteSel.addEventListener("change", () => { state.site = siteSel.value; update(); });
    layer.addEventListener("input", () => { state.layerIdx = +layer.value; update(); });
    selectLayer = (i) => { state.layerIdx = i; layer.value = String(i); update(); };
    // the layer list: one button per layer shown; the layers the plan removes whole are struck through
    const list = el("div", { id: "layer-list", class: "layer-list" });
    P.layers.forEach((L, i) => {
      const b = el("button", { class: "lyr" + (isDropped(L) ? " dropped" : ""), "data-i": String(i), "data-layer": String(L),
        title: "layer " + L + (isDropped(L) ? ": removed whole by the plan" : ""), text: String(L) });
      b.addEventListener("click", () => selectLayer(i));
      list.append(b);
    });
    s.append(list);
    if (P.dropped && P.dropped.length) s.append(el("p", { class: "muted", text: "Struck through: layers the plan (" + P.plan_source +
      ") removes whole (" + P.dropped.join(", ") + "); their neurons and heads are shown as removed." }));
    if (TR) {
      state.colour = "activation";
      const colour = el("select", { id: "colour" }, el("option", { value: "activation", text: "trace activation" }),
        el("option", { value: "cluster", text: "cluster" }));
      colour.addEventListener("change", () => { state.colour = colour.value; update(); });
      controls.append(el("label", {}, "colour by", colour));
      const tok = el("input", { id: "token", type: "range", min: "0", max: String(TR.tokens.length - 1), step: "1", value: "0" });
      const box = el("div", { id: "tokens" });
      TR.tokens.forEach((t, i) => {
        const sp = el("span", { class: "tok" + (i >= TR.n_prompt ? " gen" : ""), "data-t": String(i),
          title: "token " + i + (TR.raw_tokens ? " " + JSON.stringify(TR.raw_tokens[i]) : "") + (i >= TR.n_prompt ? " (generated)" : " (prompt)"),
          text: t === "" ? "\u00b7" : t });
        sp.addEventListener("click", () => { state.token = i; tok.value = String(i); highlight(); if (state.colour === "activation") update(); });
        box.append(sp);
        tokenSpans.push(sp);
      });
      tok.addEventListener("input", () => { state.token = +tok.value; highlight(); if (state.colour === "activation") update(); });
      const m = TR.meta || {};
      s.append(el("div", { id: "trace-controls" },
        el("div", { class: "controls" }, el("label", {}, "token", tok), el("code", { id: "token-label" }),
          el("span", { id: "trace-missing", class: "muted" })),
        box,
        el("p", { class: "muted", text: "Prompt trace (" + TR.file + "): " + TR.n_prompt + " prompt tokens (grey) and " +
          (TR.tokens.length - TR.n_prompt) + " generated (blue), " + (m.sample ? "sampled, seed " + m.seed : "greedy") +
          ". " + (m.alignment || "") + (TR.encoding === "i1" ? ". Activations stored as 8-bit integers (per-token scale)." : ".") })));
    }
    scatterDiv = el("div", { id: "scatter" });
    const side = el("div", { class: "side" }, el("div", { id: "info" }));
    if (P.heads && P.heads.rows.length && P.heads.rows.some((r) => r.energy || r.role)) {
      headsMap = el("div", { id: "heads-map" });
      side.append(headsMap);
    }
    s.append(el("div", { class: "explorer" }, scatterDiv, side));
    if (headsMap) drawHeadsMap();
  }

  // ------------------------------------------------------------------------------------- heatmaps
  let heatSel = null;
  function syncHeatmap() {
    if (!heatSel || !P) return;
    const key = keyOf();
    if (D.heatmaps.some((h) => h.key === key)) { heatSel.value = key; showHeat(); }
  }
  function showHeat() {
    const h = D.heatmaps.find((x) => x.key === heatSel.value);
    const img = document.getElementById("heatmap-img");
    if (h) { img.src = h.src; img.alt = h.name; }
  }
  if (D.heatmaps && D.heatmaps.length) {
    const s = section("sec-heatmaps", "Ordering heatmaps");
    heatSel = el("select", { id: "heatmap-select" });
    D.heatmaps.forEach((h) => heatSel.append(el("option", { value: h.key, text: h.layer !== null ? "layer " + h.layer + " · " + h.site : h.name })));
    heatSel.addEventListener("change", showHeat);
    s.append(el("p", { class: "muted", text: "Correlation of a layer's neurons before (original order) and after reordering (by the 1-D projection, and spectral order). Follows the layer slider when a picture for that layer exists." }),
      el("div", { class: "controls" }, el("label", {}, "picture", heatSel)), el("img", { id: "heatmap-img", class: "fig" }));
    showHeat();
  }

  // -------------------------------------------------------------------------------- prune summary
  if (D.summary) {
    const s = section("sec-summary", "Prune summary");
    const S = D.summary.summary;
    s.append(el("p", { class: "muted", text: D.summary.file }));
    const row = el("div", { class: "row" });
    row.append(kvTable(S));
    if (Array.isArray(S.kept)) {
      const div = el("div", { id: "summary-plot", class: "plot" });
      row.append(div);
      s.append(row);
      // x: the dense model's layer numbers when the plan names every kept layer (a plan that removes layers
      // leaves gaps), else the checkpoint's
      const dense = D.summary.layers && D.summary.layers.length === S.kept.length;
      const L = dense ? D.summary.layers : S.kept.map((_, i) => i);
      const tr = [{ type: "bar", name: "kept", x: L, y: S.kept, marker: { color: "#1565c0" } }];
      if (D.summary.widths && D.summary.widths.length === S.kept.length)
        tr.unshift({ type: "bar", name: "before", x: L, y: D.summary.widths, marker: { color: "#cfd8dc" } });
      Plotly.newPlot(div, tr, { title: { text: "MLP neurons per layer", font: { size: 13 } }, barmode: "overlay",
        xaxis: { title: { text: dense ? "layer (dense model's numbering)" : "layer" } }, yaxis: { title: { text: "neurons" } }, margin: { t: 40 } }, PCFG);
    } else s.append(row);
    if (D.summary.dropped && D.summary.dropped.length)
      s.append(el("p", { id: "summary-dropped", text: "Layers removed whole (dense numbering): " + D.summary.dropped.join(", ") }));
    if (D.summary.heads && D.summary.heads.length)
      s.append(el("h3", { text: "Attention heads per layer (the plan's; others keep every head)" }),
        sortableTable(["layer", "before", "kept", "kv_before", "kv_kept"], D.summary.heads, "summary-heads"));
  }

  // ----------------------------------------------------------------------------------- evaluation
  if (D.eval) {
    const s = section("sec-eval", "Evaluation");
    const cols = ["", ...D.eval.map((e) => e.label + " (" + e.file + ")")];
    const ppl = [];
    for (const f of ["value", "seqlen", "windows", "tokens", "data"]) {
      const r = { "": "perplexity." + f };
      D.eval.forEach((e, i) => { r[cols[i + 1]] = e.perplexity ? e.perplexity[f] : null; });
      ppl.push(r);
    }
    // the zero-shot average (lm_eval.zeroshot, when zero-shot tasks ran) beside the perplexity
    const zs = (e) => (e.lm_eval && e.lm_eval.zeroshot ? e.lm_eval.zeroshot : null);
    if (D.eval.some(zs)) {
      const rows = { average: (z) => z.average, tasks: (z) => Object.keys(z.tasks || {}).length + " of 8",
        limit: (z) => (z.limit === null || z.limit === undefined ? "all documents" : z.limit) };
      for (const [f, get] of Object.entries(rows)) {
        const r = { "": "zero-shot " + f };
        D.eval.forEach((e, i) => { r[cols[i + 1]] = zs(e) ? get(zs(e)) : null; });
        ppl.push(r);
      }
    }
    s.append(el("h3", { text: D.eval.some(zs) ? "Perplexity and zero-shot average" : "Perplexity" }),
      sortableTable(cols, ppl, "eval-table"));
    const lrows = {};
    D.eval.forEach((e, i) => {
      const tasks = e.lm_eval && e.lm_eval.tasks ? e.lm_eval.tasks : {};
      for (const [task, ms] of Object.entries(tasks)) for (const [m, v] of Object.entries(ms)) {
        if (typeof v !== "number" || m === "samples" || m === "samples_total" || m === "version") continue;
        const k = task + " · " + m;
        lrows[k] = lrows[k] || { "": k };
        lrows[k][cols[i + 1]] = v;
      }
    });
    if (Object.keys(lrows).length) s.append(el("h3", { text: "lm-eval" }), sortableTable(cols, Object.values(lrows), "lmeval-table"));
  }

  // ---------------------------------------------------------------------------------------- sweep
  if (D.sweep) {
    const s = section("sec-sweep", "Tradeoff sweep");
    const rows = D.sweep.rows;
    if (rows.length && rows[0].ppl !== undefined) {
      const div = el("div", { id: "sweep-plot", class: "plot" });
      s.append(div);
      const methods = [...new Set(rows.filter((r) => r.method !== "dense").map((r) => r.method))];
      const tr = methods.map((m) => {
        const pts = rows.filter((r) => r.method === m && typeof r.ppl === "number")
          .map((r) => [typeof r.actual_sparsity === "number" ? r.actual_sparsity : r.sparsity, r.ppl]).sort((a, b) => a[0] - b[0]);
        return { type: "scatter", mode: "lines+markers", name: m, x: pts.map((p) => p[0]), y: pts.map((p) => p[1]) };
      });
      const dense = rows.find((r) => r.method === "dense" && typeof r.ppl === "number");
      const L = { title: { text: "perplexity against fraction of MLP neurons removed", font: { size: 13 } },
        xaxis: { title: { text: "fraction removed" } }, yaxis: { title: { text: "perplexity (log)" }, type: "log" }, margin: { t: 40 } };
      if (dense) {
        L.shapes = [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: dense.ppl, y1: dense.ppl, line: { dash: "dash", color: "#000", width: 1 } }];
        L.annotations = [{ xref: "paper", x: 1, y: Math.log10(dense.ppl), text: "dense " + fmt(dense.ppl), showarrow: false, xanchor: "right", yanchor: "bottom" }];
      }
      Plotly.newPlot(div, tr, L, PCFG);
    } else if (D.sweep.png) s.append(el("img", { class: "fig", src: D.sweep.png, alt: "tradeoff.png" }));
    if (rows.length) s.append(el("h3", { text: "Cells (click a column to sort)" }), sortableTable(D.sweep.columns, rows, "sweep-table"));
  }

  // ---------------------------------------------------------------------------------------- skips
  if (D.skips) {
    const s = section("sec-skips", "Skip candidates");
    const K = D.skips;
    if (K.summary) s.append(el("p", { class: "muted", text: K.summary.file }), kvTable(K.summary.values));
    if (K.map) {
      const div = el("div", { id: "skips-map", class: "plot" });
      s.append(div);
      Plotly.newPlot(div, [{ type: "heatmap", x: K.map.layers, y: K.map.layers, z: K.map.z, colorscale: "Viridis",
        hovertemplate: "from layer %{x} to layer %{y}: %{z}<extra></extra>", colorbar: { title: { text: "links" } } }],
        { title: { text: "skip candidates: source layer × target layer (" + K.map.count + " links, " + K.map.from + ")", font: { size: 13 } },
          xaxis: { title: { text: "source layer l" }, dtick: 1 }, yaxis: { title: { text: "target layer m" }, dtick: 1 }, margin: { t: 40 } }, PCFG);
    }
    K.tables.forEach((t, i) => {
      s.append(el("h3", { text: t.name + " (" + t.total + " rows" + (t.rows.length < t.total ? ", first " + t.rows.length + " shown" : "") + "; click a column to sort)" }),
        sortableTable(t.columns, t.rows, "skips-table-" + i));
    });
    K.pngs.forEach((p) => s.append(el("h3", { text: p.name }), el("img", { class: "fig", src: p.src, alt: p.name })));
  }

  if (!app.querySelector("section")) app.append(el("p", { id: "empty", text: "Nothing to show: the run directory holds none of the files the report reads." }));
  if (P && P.layers.length) { update(); if (TR) highlight(); }
  window.nppReport = { data: D, state: state, update: update, arr: arr, traceRow: traceRow };
  document.body.setAttribute("data-ready", "1");
})();
