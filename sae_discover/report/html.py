"""Reports as one self-contained HTML file: inline CSS and script (``assets.py``), no network, opens from disk.

Every piece of user text (prompts, tokens, labels, ids) goes through :func:`esc` into the markup; the
data the script reads is JSON inside ``<script type="application/json">`` with every ``<`` written as
``\\u003c`` (:func:`embed`), so no string can close the block or open a tag.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

from sae_discover.output import verification_lines
from sae_discover.report.assets import CSS, JS

# the feature table's columns: heading, and the value of a response feature (None: not a number)
COLUMNS = ("rank", "feature", "layer", "stream", "score", "mean", "cover%", "max", "selectivity")


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def embed(data: object) -> str:
    """JSON for a ``<script type="application/json">`` block: nothing in it can end the block."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def page(title: str, body: str, script: bool = True, extra_script: str = "") -> str:
    """The whole document: ``script`` adds the report script (run sections), ``extra_script`` another one."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"  # no favicon request: the page fetches nothing
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header class=\"top\"><h1>{esc(title)}</h1></header><main>{body}</main><div id=\"tip\"></div>"
            + (f"<script>{JS}</script>" if script else "") + (f"<script>{extra_script}</script>" if extra_script else "")
            + "</body></html>\n")


def _num(value: float | None, digits: int = 4) -> str:
    """``digits`` significant digits (a mean×coverage score is often ~1e-4: fixed decimals would show 0)."""
    return "-" if value is None else f"{value:.{digits}g}"


def _meta(pairs: Sequence[tuple[str, str]]) -> str:
    return "<dl class=\"meta\">" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs) + "</dl>"


def _header(section: dict) -> str:
    r, run = section["response"], section["run"]
    a = r["analyzed"]
    saes = "; ".join(f"{s['sae_id']} L{s['layer']} {s['stream']} ({s['architecture'] or '?'}, d_sae {s['d_sae']}, "
                     f"hook {s['hook_name'] or '-'})" for s in section["saes"])
    timings = r.get("timings") or run.get("timings") or {}
    pairs = [("model", r["model_id"]), ("SAEs", saes or r["sae_id"]), ("mode", a["mode"]),
             ("tokens", f"{a['tokens']} analyzed of {a['total_tokens']}"),
             ("score mode", r["score_mode"]), ("background", r.get("background") or "-"),
             ("gate", f"coverage ≥ {r['min_coverage_pct']:g} % of analyzed tokens above τ"),
             ("ranking", "one over all hooks" if r["merge_across_layers"] else "the top of each hook (# is the rank "
                                                                             "within its hook)"),
             ("τ source", r["threshold_source"]), ("calibration", str(r.get("calibration_id") or "none")),
             ("normalization", r["normalization"]), ("run", f"{r['run_id']} ({'cached' if r['cached'] else 'new run'}, "
                                                            f"stored {run.get('created_at')})")]
    if run.get("prompt") is not None:
        pairs.append(("prompt", run["prompt"]))
    if run.get("generate"):
        pairs.append(("generation", f"{run['gen_tokens']} tokens, seed {run['seed']}, temperature {run['temperature']}, "
                                    f"top_p {run['top_p']}"))
    if timings:
        pairs.append(("timings", ", ".join(f"{k} {v:.3f}" for k, v in timings.items()
                                           if isinstance(v, int | float))))
    if r.get("verification"):  # what the attributions are of (M), and how the ablations bore them out
        pairs.append(("verification", verification_lines(r["verification"])[0]))
    warn = "".join(f"<li>{esc(w)}</li>" for w in r.get("warnings", []))
    return _meta(pairs) + (f"<ul class=\"warn\">{warn}</ul>" if warn else "")


def _tokens(section: dict) -> str:
    spans = []
    for t in section["tokens"]:
        cls = ["tok", *(["gen"] if t["generated"] else []), *(["special"] if t["special"] else []),
               *(["drop"] if not t["kept"] else [])]
        spans.append(f"<span class=\"{' '.join(cls)}\" data-i=\"{t['position']}\">{esc(t['token'])}</span>")
    return "<div class=\"tokens\">" + "".join(spans) + "</div>"


def _attribution(f: dict) -> float | None:
    """A feature's attribution score when the response has one (optional: runs made with attribution)."""
    value = f.get("attribution", f["scores"].get("attribution"))
    return value if isinstance(value, int | float) else None


def _label(f: dict, stored: list[dict]) -> tuple[str, str]:
    if f.get("proto_label"):
        source = next((x["source"] for x in stored if x["label"] == f["proto_label"]), "")
        return f["proto_label"], source
    return (stored[0]["label"], stored[0]["source"]) if stored else ("", "")


def _ranks(feats: list[dict], merged: bool) -> list[int]:
    """Each feature's rank as listed: over the whole list when ranked across hooks, else within its
    (layer, stream) — those lists come grouped by hook, each in its own order."""
    if merged:
        return list(range(1, len(feats) + 1))
    seen: dict[tuple, int] = {}
    out = []
    for f in feats:
        hook = (f["layer"], f["stream"])
        seen[hook] = seen.get(hook, 0) + 1
        out.append(seen[hook])
    return out


def _table(section: dict, n: int) -> str:
    feats = section["response"]["features"]
    has_attr = any(_attribution(f) is not None for f in feats)
    has_delta = any("ablation_delta" in f for f in feats)
    heads = [*COLUMNS, *(["attribution"] if has_attr else []), *(["ablate Δ"] if has_delta else []), "label"]
    th = "".join(f"<th data-k=\"{i}\"{' class=lab' if h == 'label' else ''}>{esc(h)}</th>" for i, h in enumerate(heads))
    rows = []
    ranks = _ranks(feats, section["response"]["merge_across_layers"])
    for i, (f, extra, rank) in enumerate(zip(feats, section["features"], ranks, strict=True)):
        s = f["scores"]
        nums = [(rank, str(rank)), (f["feature_id"], str(f["feature_id"])), (f["layer"], str(f["layer"]))]
        cells = [f"<td data-v=\"{v}\">{esc(t)}</td>" for v, t in nums]
        cells.append(f"<td>{esc(f['stream'])}</td>")
        for value, digits in ((f["score"], 4), (s["mean"], 4), (100 * s["coverage"], 3), (s["max"], 4),
                              (s["selectivity"], 4), *([(_attribution(f), 4)] if has_attr else []),
                              *([(f.get("ablation_delta"), 4)] if has_delta else [])):
            cells.append(f"<td data-v=\"{'' if value is None else repr(float(value))}\">{_num(value, digits)}</td>")
        label, source = _label(f, extra["l"])
        cells.append(f"<td class=\"lab\"><div>{esc(label)}" + (f" <span class=\"src\">({esc(source)})</span>" if source
                                                              else "") + "</div></td>")
        rows.append(f"<tr data-f=\"{i}\" data-feature=\"{f['feature_id']}\">{''.join(cells)}</tr>")
    body = "".join(rows) or f"<tr><td colspan=\"{len(heads)}\" class=\"empty\">no feature passed the gates</td></tr>"
    radios = ("<div class=\"legend\">color tokens by: <label><input type=radio name=\"color-{n}\" value=act checked> "
              "activation</label> <label><input type=radio name=\"color-{n}\" value=attr> attribution</label></div>"
              .replace("{n}", str(n)) if has_attr else "")
    return (f"{radios}<input class=\"filter\" type=\"search\" placeholder=\"filter features (id, stream, label)\" "
            f"aria-label=\"filter features\"><div class=\"tablewrap\"><table class=\"feats\"><thead><tr>{th}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def run_html(section: dict, n: int = 0) -> str:
    """One run's section (the ``n``-th of the page: its anchor, as two batch lines may share a run):
    header, tokens with the heatmap, feature table and the selected feature's detail."""
    r = section["response"]
    data = {"response": r, "features": section["features"]}
    colour = ("activation or attribution (click a row; toggle above the table; orange +, blue −)"
              if any(_attribution(f) is not None for f in r["features"]) else "activation (click a row)")
    legend = ("<div class=\"legend\"><span><u>underlined</u>: generated</span><span style=\"color:#a9b0b8\">grey: "
              f"special or not kept</span><span>colour: the selected feature's {colour}</span></div>")
    line = f"{esc(r['id'])} · " if r.get("id") else ""
    return (f"<section class=\"run\" id=\"run-{n}\" data-run-id=\"{esc(r['run_id'])}\"><h2>{line}Run "
            f"{esc(r['run_id'][:12])} · {esc(r['model_id'])} · {esc(r['sae_id'])}</h2>{_header(section)}"
            f"<div class=\"grid\"><div><h3>Tokens</h3>{legend}{_tokens(section)}<div class=\"detail\"></div></div>"
            f"<div><h3>Features ({len(r['features'])})</h3>{_table(section, n)}</div></div>"
            f"<script type=\"application/json\" class=\"data\">{embed(data)}</script></section>")


def run_page(sections: Sequence[dict], errors: Sequence[tuple[str, str]] = (), title: str | None = None) -> str:
    """A report of one run, or of a batch (an index of its runs, each linking to its section, and the
    lines that failed with their error)."""
    if len(sections) == 1 and not errors:
        r = sections[0]["response"]
        return page(title or f"sae-discover · run {r['run_id'][:12]}", run_html(sections[0]))
    items = [f"<li><a href=\"#run-{n}\">{esc(s['response'].get('id') or '')} "
             f"{esc(s['response']['run_id'][:12])}</a> — {esc(_clip(s['response']['analyzed'].get('text') or ''))}</li>"
             for n, s in enumerate(sections)]
    items += [f"<li class=\"err\">{esc(line_id)}: {esc(message)}</li>" for line_id, message in errors]
    index = f"<nav class=\"index\"><h2>Runs ({len(sections)} ok, {len(errors)} failed)</h2><ol>{''.join(items)}</ol></nav>"
    return page(title or "sae-discover · batch", index + "".join(run_html(s, n) for n, s in enumerate(sections)))


def _clip(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- drift ----------------------------------------------------------------------------------------

def _bars(base: float, tuned: float, top: float) -> str:
    def width(v: float) -> str:
        return f"{100 * max(0.0, v) / top:.1f}%" if top > 0 else "0%"
    return (f"<span class=\"bars\" title=\"base {base:.4f} → tuned {tuned:.4f}\"><div class=\"bar b\" "
            f"style=\"width:{width(base)}\"></div><div class=\"bar t\" style=\"width:{width(tuned)}\"></div></span>")


def _flagged(name: str, flagged: list[dict], top: float) -> str:
    if not flagged:
        return f"<h3>{esc(name)}: 0</h3>"
    rows = "".join(
        f"<tr data-feature=\"{f['feature_id']}\"><td>{f['feature_id']}</td><td>{f['layer']}</td><td class=l>"
        f"{esc(f['stream'])}</td><td>{f['rank_base'] or '-'} → {f['rank_tuned'] or '-'}</td>"
        f"<td>{f['score_base']:.4f} → {f['score_tuned']:.4f}</td><td>{_bars(f['score_base'], f['score_tuned'], top)}</td>"
        f"<td>{f['score_change']:+.4f}</td><td class=l>{esc(f['proto_label'] or '')}</td></tr>" for f in flagged)
    return (f"<h3>{esc(name)}: {len(flagged)}</h3><table class=\"plain flag-{esc(name)}\"><thead><tr><th>feature</th>"
            "<th>layer</th><th class=l>stream</th><th>rank base → tuned</th><th>score base → tuned</th>"
            f"<th>base / tuned</th><th>Δscore</th><th class=l>proto-label</th></tr></thead><tbody>{rows}</tbody></table>")


def _scatter(features: list[dict], size: int = 360, pad: int = 34) -> str:
    """Base vs tuned aggregate score of every feature of the union of both top-K; flagged ones coloured. Square-root
    axes: a few large scores would otherwise press the many small ones into a corner."""
    top = max([max(f["score_base"], f["score_tuned"]) for f in features] + [1e-9])
    colours = {"gained": "rgb(255,112,0)", "lost": "#2a7de1", "shifted": "#9b3fd1"}
    span = size - 2 * pad

    def xy(f: dict) -> tuple[float, float]:
        return (pad + span * (max(0.0, f["score_base"]) / top) ** 0.5,
                size - pad - span * (max(0.0, f["score_tuned"]) / top) ** 0.5)

    dots = "".join(
        f"<circle cx=\"{x:.1f}\" cy=\"{y:.1f}\" r=\"{4 if f['flag'] else 2.5}\" fill=\"{colours.get(f['flag'], '#a9b0b8')}\""
        f" class=\"pt {esc(f['flag'] or 'none')}\"><title>feature {f['feature_id']} L{f['layer']} {esc(f['stream'])}: "
        f"{f['score_base']:.4f} → {f['score_tuned']:.4f}{' (' + esc(f['flag']) + ')' if f['flag'] else ''}</title></circle>"
        for f in features for x, y in [xy(f)])
    legend = "".join(f"<tspan fill=\"{c}\"> ● {k}</tspan>" for k, c in colours.items())
    return (f"<svg class=\"scatter\" width=\"{size}\" height=\"{size}\" role=\"img\" aria-label=\"base vs tuned scores\">"
            f"<line x1=\"{pad}\" y1=\"{size - pad}\" x2=\"{size - pad}\" y2=\"{pad}\" stroke=\"#d9dee4\"/>"
            f"<line x1=\"{pad}\" y1=\"{size - pad}\" x2=\"{size - pad}\" y2=\"{size - pad}\" stroke=\"#6b7480\"/>"
            f"<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{size - pad}\" stroke=\"#6b7480\"/>{dots}"
            f"<text x=\"{size / 2 - 40}\" y=\"{size - 8}\">base score (√ scale)</text>"
            f"<text x=\"4\" y=\"{pad - 12}\">tuned score (√ scale, max {top:.4f})</text>"
            f"<text x=\"{pad + 4}\" y=\"{pad + 4}\">{legend}</text></svg>")


def drift_page(report: dict) -> str:
    """A drift report: overall figures, per prompt, gained / lost / shifted with base→tuned bar pairs, and
    a scatter of base vs tuned scores with the flagged features highlighted. Static (no script needed)."""
    o, k = report["overall"], report["top_k"]
    base = report["base"]["model_id"] or "/".join(report["base"]["model_ids"])
    tuned = report["tuned"]["model_id"] or "/".join(report["tuned"]["model_ids"])
    pairs = [("base → tuned", f"{base} → {tuned}"), ("SAE", report["sae_id"]),
             ("hooks", ", ".join(f"L{layer} {stream}" for layer, stream in report["hooks"])),
             ("score mode", report["score_mode"]), ("τ source", report["threshold_source"]),
             ("normalization", report["normalization"]), ("K", str(k)),
             ("overall", f"{o['n_prompts']} prompt(s): Jaccard@{k} {_num(o['jaccard'], 3)} · Spearman (top-{k} union) "
                         f"{_num(o['spearman'], 3)} · Spearman (all) {_num(o['spearman_all'], 3)} · gained {o['n_gained']} · "
                         f"lost {o['n_lost']} · shifted {o['n_shifted']}")]
    warn = "".join(f"<li>{esc(w)}</li>" for w in report.get("warnings", []))
    prompts = "".join(
        f"<tr><td>{p['index']}</td><td class=l>{esc(p['id'] or '')}</td><td>{_num(p['jaccard'], 3)}</td>"
        f"<td>{_num(p['spearman'], 3)}</td><td>{p['n_gained']}</td><td>{p['n_lost']}</td><td>{p['n_shifted']}</td>"
        f"<td class=l>{esc(_clip(p.get('text') or p.get('prompt') or ''))}</td></tr>" for p in report["prompts"])
    top = max([max(f["score_base"], f["score_tuned"]) for f in report["features"]] + [1e-9])
    flagged = "".join(_flagged(name, report["flagged"][name], top) for name in ("gained", "lost", "shifted"))
    body = (f"<section class=\"drift\"><h2>Drift</h2>{_meta(pairs)}"
            + (f"<ul class=\"warn\">{warn}</ul>" if warn else "")
            + "<div class=\"grid\"><div><h3>Per prompt</h3><table class=\"plain prompts\"><thead><tr><th>#</th>"
              f"<th class=l>id</th><th>Jaccard@{k}</th><th>Spearman</th><th>gained</th><th>lost</th><th>shifted</th>"
              f"<th class=l>prompt / text</th></tr></thead><tbody>{prompts}</tbody></table>{flagged}</div>"
              f"<div><h3>Base vs tuned aggregate score</h3>{_scatter(report['features'])}</div></div>"
              f"<script type=\"application/json\" class=\"drift-data\">{embed(report)}</script></section>")
    return page(f"sae-discover · drift {base} → {tuned}", body, script=False)
