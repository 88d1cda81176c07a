"""The report's inline stylesheet and script (one file, no network: nothing is fetched from anywhere).

The script reads each run section's data from its ``<script type="application/json">`` block and only
ever writes text with ``textContent`` (never ``innerHTML`` with data), so user text stays text.
"""

CSS = """
:root { --ink:#1d2329; --mute:#6b7480; --line:#d9dee4; --bg:#fafbfc; --hot:255,112,0; --cold:40,110,230; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); margin: 0; background: #fff; }
header.top { padding: 14px 22px; border-bottom: 1px solid var(--line); background: var(--bg); }
header.top h1 { font-size: 18px; margin: 0; }
main { padding: 10px 22px 40px; }
section.run, section.drift { border-bottom: 2px solid var(--line); padding-bottom: 18px; margin-bottom: 18px; }
h2 { font-size: 16px; margin: 14px 0 6px; } h3 { font-size: 14px; margin: 12px 0 4px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; font-size: 13px; }
dl.meta dt { color: var(--mute); } dl.meta dd { margin: 0; }
ul.warn { color: #8a5300; font-size: 13px; margin: 4px 0; padding-left: 18px; }
.grid { display: grid; grid-template-columns: minmax(0, 1.15fr) minmax(0, 1fr); gap: 18px; align-items: start; }
@media (max-width: 1100px) { .grid { grid-template-columns: minmax(0, 1fr); } }  /* narrow: the table below the tokens */
.tokens { font: 13px/1.9 ui-monospace, "SFMono-Regular", Menlo, monospace; white-space: pre-wrap; word-break: break-word;
          border: 1px solid var(--line); border-radius: 6px; padding: 10px; max-height: 60vh; overflow: auto; }
.tok { border-radius: 3px; padding: 1px 0; cursor: default; }
.tok.gen { text-decoration: underline dotted #8a8fb0; text-underline-offset: 4px; }
.tok.special, .tok.drop { color: #a9b0b8; }
.tok.special { font-style: italic; }
.tok.on { outline: 1px solid rgba(var(--hot),.55); }
.legend { font-size: 12px; color: var(--mute); margin: 4px 0; }
.legend span { margin-right: 12px; }
table.feats { border-collapse: collapse; width: 100%; font-size: 12.5px; }
table.feats th, table.feats td { padding: 3px 6px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
table.feats th { cursor: pointer; user-select: none; position: sticky; top: 0; background: #fff; }
table.feats th.sorted-desc::after { content: " ▾"; } table.feats th.sorted-asc::after { content: " ▴"; }
table.feats td.lab, table.feats th.lab { text-align: left; white-space: normal; }
table.feats td.lab > div { min-width: 12em; max-width: 28em; }
table.feats tbody tr { cursor: pointer; } table.feats tbody tr:hover { background: #f3f6fa; }
table.feats tbody tr.sel { background: #ffe9d6; }
.tablewrap { max-height: 60vh; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
input.filter { width: 100%; padding: 5px 8px; margin: 4px 0; border: 1px solid var(--line); border-radius: 4px; }
.detail { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin-top: 12px; background: var(--bg); }
.detail .span { font-family: ui-monospace, Menlo, monospace; white-space: pre-wrap; margin: 3px 0; font-size: 12.5px; }
.detail mark { background: rgba(var(--hot),.45); border-radius: 2px; }
.chips.suppresses span { border-color: rgba(var(--cold),.45); }
.chips span { display: inline-block; border: 1px solid var(--line); border-radius: 10px; padding: 0 7px; margin: 2px 3px 2px 0;
              font-family: ui-monospace, Menlo, monospace; font-size: 12px; background: #fff; white-space: pre; }
.src { color: var(--mute); font-size: 12px; }
#tip { position: fixed; display: none; pointer-events: none; background: #1d2329; color: #fff; font-size: 12px; padding: 6px 8px;
       border-radius: 5px; max-width: 340px; white-space: pre; z-index: 9; }
nav.index ol { margin: 6px 0; padding-left: 22px; } nav.index .err { color: #b00020; }
.bars { display: inline-block; width: 140px; vertical-align: middle; }
.bar { height: 6px; margin: 1px 0; border-radius: 2px; } .bar.b { background: #8a94a6; } .bar.t { background: rgb(var(--hot)); }
table.plain { border-collapse: collapse; font-size: 12.5px; } table.plain th, table.plain td { padding: 3px 8px;
  border-bottom: 1px solid var(--line); text-align: right; } table.plain td.l, table.plain th.l { text-align: left; }
svg text { font: 11px system-ui, sans-serif; fill: var(--mute); }
.empty { color: var(--mute); font-style: italic; }
"""

JS = r"""
(function () {
  "use strict";
  var tip = document.getElementById("tip");
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text); return e; }
  function fmt(x, d) { return (x === null || x === undefined) ? "-" : Number(x).toFixed(d === undefined ? 3 : d); }
  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) { var e = document.createElementNS(SVG, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]); return e; }

  function Run(section) {
    var data = JSON.parse(section.querySelector("script.data").textContent);
    var feats = data.features, resp = data.response.features;
    var toks = {}, byPos = {};
    section.querySelectorAll(".tok").forEach(function (t) { toks[t.dataset.i] = t; });
    feats.forEach(function (f, fi) { for (var j = 0; j < f.p.length; j++) {
      (byPos[f.p[j]] = byPos[f.p[j]] || []).push([fi, f.a[j], f.t ? f.t[j] : null]); } });
    var lit = [], rows = section.querySelectorAll("table.feats tbody tr[data-f]"), mode = "act";
    var detail = section.querySelector(".detail"), current = -1;

    function color(v, scale) {
      if (!scale) return "";
      var x = Math.min(1, Math.abs(v) / scale);
      return "rgba(var(" + (v < 0 ? "--cold" : "--hot") + ")," + (0.12 + 0.78 * x).toFixed(3) + ")";
    }
    function select(fi) {
      current = fi;
      lit.forEach(function (t) { t.classList.remove("on"); t.style.backgroundColor = ""; });
      lit = [];
      rows.forEach(function (r) { r.classList.toggle("sel", Number(r.dataset.f) === fi); });
      if (fi < 0) return;
      var f = feats[fi], vals = (mode === "attr" && f.t) ? f.t : f.a, scale = 0;
      vals.forEach(function (v) { if (v !== null) scale = Math.max(scale, Math.abs(v)); });
      f.p.forEach(function (pos, j) { var t = toks[pos]; if (!t) return;
        t.classList.add("on"); t.style.backgroundColor = color(vals[j] || 0, scale); lit.push(t); });
      showDetail(fi);
    }
    function hist(h, runMax) {
      var w = 320, hgt = 90, pad = 16, box = svg("svg", {width: w, height: hgt + 2 * pad, "class": "hist"});
      var top = Math.max.apply(null, h.counts.concat([1])), bw = (w - 2) / h.counts.length;
      h.counts.forEach(function (c, i) { if (!c) return;
        var bh = Math.max(1, hgt * Math.log(1 + c) / Math.log(1 + top));
        box.appendChild(svg("rect", {x: 1 + i * bw, y: pad + hgt - bh, width: Math.max(1, bw - 1), height: bh,
                                     fill: "#8a94a6"})); });
      function mark(v, colr, label, dy) { if (!(h.max > 0)) return; var x = 1 + Math.min(1, v / h.max) * (w - 2);
        box.appendChild(svg("line", {x1: x, x2: x, y1: pad - 4, y2: pad + hgt, stroke: colr, "stroke-width": 2}));
        var t = svg("text", {x: Math.min(x + 3, w - 90), y: dy}); t.textContent = label; box.appendChild(t); }
      mark(h.p95, "#2a7de1", "P95 τ " + fmt(h.p95), 11);
      if (runMax !== null) mark(runMax, "rgb(255,112,0)", "this run " + fmt(runMax), hgt + 2 * pad - 2);
      return box;
    }
    function showDetail(fi) {
      var f = feats[fi], r = resp[fi];
      detail.textContent = "";
      detail.appendChild(el("h3", null, "feature " + r.feature_id + " · layer " + r.layer + " " + r.stream));
      var spans = r.top_spans || [];
      detail.appendChild(el("div", "src", spans.length ? "top spans (peak marked)" : "no top spans in this response"));
      spans.forEach(function (s) {
        var d = el("div", "span"), parts = String(s.marked).split(/\[\[|\]\]/);
        parts.forEach(function (p, i) { d.appendChild(i % 2 ? el("mark", null, p) : document.createTextNode(p)); });
        d.appendChild(el("span", "src", "  act " + fmt(s.act))); detail.appendChild(d); });
      var runMax = f.a.length ? Math.max.apply(null, f.a) : null;
      if (f.h) {
        detail.appendChild(el("div", "src", "calibration histogram (log counts of nonzero activations over " + f.h.n_tokens +
          " tokens; " + f.h.zeros + " zeros; density " + fmt(f.h.density, 4) + ", mean " + fmt(f.h.mean, 4) +
          ", max " + fmt(f.h.max) + ")"));
        detail.appendChild(hist(f.h, runMax));
      } else { detail.appendChild(el("div", "empty", "no calibration of this SAE for this model: no histogram")); }
      [["promotes", f.d], ["suppresses", f.s]].forEach(function (pair) {
        detail.appendChild(el("div", "src", "tokens its decoder direction " + pair[0] + " (lite label)"));
        var chips = el("div", "chips " + pair[0]);
        if (pair[1] && pair[1].length) pair[1].forEach(function (t) { chips.appendChild(el("span", null, t)); });
        else chips.appendChild(el("span", "empty", "none stored"));
        detail.appendChild(chips);
      });
      detail.appendChild(el("div", "src", "labels"));
      if (!f.l.length) detail.appendChild(el("div", "empty", "no stored label"));
      f.l.forEach(function (l) { var d = el("div", null, l.label);
        d.appendChild(el("span", "src", "  — " + l.source + (l.score === null ? "" : " (score " + fmt(l.score) + ")")));
        detail.appendChild(d); });
    }
    rows.forEach(function (r) { r.addEventListener("click", function () { select(Number(r.dataset.f)); }); });
    section.querySelectorAll("table.feats th[data-k]").forEach(function (th) {
      th.addEventListener("click", function () {
        var k = Number(th.dataset.k), desc = !th.classList.contains("sorted-desc");
        section.querySelectorAll("table.feats th").forEach(function (o) { o.classList.remove("sorted-desc", "sorted-asc"); });
        th.classList.add(desc ? "sorted-desc" : "sorted-asc");
        var body = section.querySelector("table.feats tbody"), list = Array.prototype.slice.call(body.rows);
        function key(row) { var c = row.cells[k], v = c.dataset.v;
          return v === undefined ? c.textContent : (v === "" ? -Infinity : Number(v)); }
        list.sort(function (a, b) { var x = key(a), y = key(b); var c = x < y ? -1 : x > y ? 1 : 0; return desc ? -c : c; });
        list.forEach(function (row) { body.appendChild(row); });
      });
    });
    var filter = section.querySelector("input.filter");
    if (filter) filter.addEventListener("input", function () {
      var q = filter.value.toLowerCase();
      rows.forEach(function (r) { r.style.display = r.textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none"; });
    });
    section.querySelectorAll("input[name^=color]").forEach(function (radio) {
      radio.addEventListener("change", function () { mode = radio.value; select(current); });
    });
    section.querySelector(".tokens").addEventListener("mouseover", function (ev) {
      var t = ev.target.closest(".tok"); if (!t) { tip.style.display = "none"; return; }
      var hits = (byPos[t.dataset.i] || []).slice().sort(function (a, b) { return b[1] - a[1]; }).slice(0, 8);
      var lines = ["token " + t.dataset.i + ": " + JSON.stringify(t.textContent) +
                   (t.classList.contains("gen") ? " (generated)" : "")];
      hits.forEach(function (h) { var r = resp[h[0]];
        lines.push("#" + r.feature_id + " L" + r.layer + " " + r.stream + "  " + fmt(h[1]) +
                   (h[2] === null || h[2] === undefined ? "" : "  attr " + fmt(h[2], 4))); });
      if (!hits.length) lines.push("no shown feature fires here");
      tip.textContent = lines.join("\n"); tip.style.display = "block";
      // below-right of the pointer; above it near the bottom edge, left of it near the right: never off screen
      var w = tip.offsetWidth, h = tip.offsetHeight;
      var x = ev.clientX + 12 + w > window.innerWidth ? ev.clientX - 12 - w : ev.clientX + 12;
      var y = ev.clientY + 14 + h > window.innerHeight ? ev.clientY - 8 - h : ev.clientY + 14;
      tip.style.left = Math.max(0, x) + "px"; tip.style.top = Math.max(0, y) + "px";
    });
    section.querySelector(".tokens").addEventListener("mouseleave", function () { tip.style.display = "none"; });
    if (feats.length) select(0);
  }
  document.querySelectorAll("section.run").forEach(Run);
})();
"""
