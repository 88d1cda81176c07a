"""The browser side of the API: ``GET /v1/runs/{run_id}/report`` (a run's HTML report, the CLI's
``runs report``) and ``GET /`` (a small UI: stored runs, newest first, paged and filtered by model / SAE,
each opening its report; and a discovery form that shows the new run's report).

The UI page holds no data of its own: its script reads the JSON routes (``/v1/runs``, ``/healthz``,
``/v1/sae/features/discover``) and writes what they return with ``textContent`` only, so user text is
never markup. Same rules as the JSON routes: registry ids only, the server's limits.
"""

from typing import Annotated, Any

import msgspec
from litestar import MediaType, Request, Response, get
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.params import Parameter
from litestar.types import ControllerRouterHandler

from api import schemas
from api.errors import refuse_repeated_query
from api.service import ApiService
from api.settings import ApiSettings
from catalog.ranking import ATTRIBUTION_MODES
from sae_discover.errors import RequestError
from sae_discover.report import run_report
from sae_discover.report.html import embed, page
from sae_discover.request import RERANK_FIELDS, DiscoverRequest, check_value, options

UI_SCRIPT = r"""
(function () {
  "use strict";
  var conf = JSON.parse(document.getElementById("ui-conf").textContent), offset = 0, LIMIT = 20;
  function $(id) { return document.getElementById(id); }
  function el(tag, text) { var e = document.createElement(tag); if (text !== undefined) e.textContent = String(text); return e; }
  function clip(s, n) { s = String(s || "").replace(/\s+/g, " "); return s.length > n ? s.slice(0, n - 1) + "…" : s; }
  function reportUrl(id, query) { return "/v1/runs/" + encodeURIComponent(id) + "/report" + (query || ""); }
  function load() {
    var q = new URLSearchParams({limit: LIMIT, offset: offset});
    ["model_id", "sae_id"].forEach(function (k) { var v = $("f-" + k).value.trim(); if (v) q.set(k, v); });
    fetch("/v1/runs?" + q.toString()).then(answer).then(function (res) {
      var page = res[1], body = $("runs-body"); body.textContent = "";
      if (!res[0]) { $("runs-count").textContent = "error: " + page.detail; return; }
      (page.runs || []).forEach(function (run) {
        var tr = el("tr"), a = el("a", run.run_id.slice(0, 12)); a.href = reportUrl(run.run_id); a.className = "open";
        var td = el("td"); td.appendChild(a); tr.appendChild(td);
        [String(run.created_at).slice(0, 19), run.model_id, run.sae_id, run.mode, run.n_kept + "/" + run.n_tokens,
         clip(run.prompt !== null ? run.prompt : run.text, 80)].forEach(function (v) { tr.appendChild(el("td", v)); });
        body.appendChild(tr);
      });
      $("runs-count").textContent = (page.total ? (offset + 1) + "–" + (offset + page.runs.length) : "0") + " of " + page.total;
      if (!page.runs.length) { var none = el("tr"), cell = el("td", page.total ? "no run on this page" :
        "no stored run matches"); cell.colSpan = 7; none.appendChild(cell); body.appendChild(none); }
      $("prev").disabled = offset === 0; $("next").disabled = offset + LIMIT >= page.total;
    }).catch(function (e) { $("runs-count").textContent = "the server did not answer (" + e.message + ")"; });
  }
  // a response as [ok, its JSON]: errors carry the server's detail ("field: what was expected")
  function answer(r) { return r.json().then(function (j) { return [r.ok, j]; }); }
  $("prev").addEventListener("click", function () { offset = Math.max(0, offset - LIMIT); load(); });
  $("next").addEventListener("click", function () { offset += LIMIT; load(); });
  $("filter").addEventListener("submit", function (ev) { ev.preventDefault(); offset = 0; load(); });
  function fill(select, values) { values.forEach(function (v) { var o = el("option", v); o.value = v; select.appendChild(o); }); }
  fill($("d-score_mode"), conf.score_modes); $("d-score_mode").value = conf.default_score_mode;
  fetch("/healthz").then(function (r) { return r.json(); }).then(function (h) {
    fill($("d-model_id"), h.models); fill($("d-sae_id"), h.saes);
  });
  $("discover").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var body = {model_id: $("d-model_id").value, sae_id: $("d-sae_id").value, generate: $("d-generate").checked,
                score_mode: $("d-score_mode").value, return_top_x: Number($("d-return_top_x").value),
                attach_examples: true, attach_proto_labels: true};
    body[$("d-kind").value] = $("d-input").value;
    if (body.generate) body.gen_tokens = Number($("d-gen_tokens").value);
    var layers = $("d-layers").value.trim(); if (layers) body.layers = layers.split(/[\s,]+/).map(Number);
    $("d-status").textContent = "running…";
    fetch("/v1/sae/features/discover", {method: "POST", headers: {"content-type": "application/json"},
                                        body: JSON.stringify(body)})
      .then(answer)
      .then(function (res) {
        if (!res[0]) { $("d-status").textContent = "error: " + res[1].detail; return; }
        var q = new URLSearchParams({score_mode: body.score_mode, return_top_x: body.return_top_x});
        window.location.href = reportUrl(res[1].run_id, "?" + q.toString());
      }).catch(function (e) { $("d-status").textContent = "the server did not answer (" + e.message + ")"; });
  });
  load();
})();
"""

UI_BODY = """
<section><h2>Run a discovery</h2>
<form id="discover" class="ui">
 <label>model <select id="d-model_id"></select></label> <label>SAE <select id="d-sae_id"></select></label>
 <label>layers <input id="d-layers" size="8" placeholder="default"></label>
 <label>score <select id="d-score_mode"></select></label>
 <label>features <input id="d-return_top_x" type="number" min="1" value="{top}" style="width:5em"></label><br>
 <select id="d-kind"><option value="prompt">prompt</option><option value="text">text</option></select>
 <textarea id="d-input" rows="3" cols="90" required maxlength="{max_chars}"></textarea><br>
 <label><input id="d-generate" type="checkbox"> generate</label>
 <label>tokens <input id="d-gen_tokens" type="number" min="1" max="{max_gen}" value="{gen}" style="width:5em"></label>
 <button type="submit">Discover</button> <span id="d-status" class="src"></span>
</form></section>
<section><h2>Stored runs</h2>
<form id="filter" class="ui"><label>model <input id="f-model_id" size="14"></label>
 <label>SAE <input id="f-sae_id" size="14"></label> <button type="submit">Filter</button>
 <button type="button" id="prev">← newer</button> <button type="button" id="next">older →</button>
 <span id="runs-count" class="src"></span></form>
<table class="plain runs"><thead><tr><th class=l>run</th><th class=l>created</th><th class=l>model</th><th class=l>SAE</th>
<th class=l>mode</th><th>kept/all</th><th class=l>prompt / text</th></tr></thead><tbody id="runs-body"></tbody></table>
</section>
"""


def index_page(svc: ApiService) -> str:
    """The UI page: the form (with this server's limits) and the run list, filled by the script."""
    choices = {o.name: o for o in options(DiscoverRequest)}
    s = svc.settings
    body = (UI_BODY.replace("{top}", str(min(int(choices["return_top_x"].default), s.max_return_top_x)))
            .replace("{max_chars}", str(s.max_text_chars)).replace("{max_gen}", str(s.max_gen_tokens))
            .replace("{gen}", str(min(16, s.max_gen_tokens))))
    # the form has no attribution target, so it offers the modes that need none; the request's default first
    conf = {"score_modes": [m for m in choices["score_mode"].choices if m not in ATTRIBUTION_MODES],
            "default_score_mode": choices["score_mode"].default}
    return page("sae-discover", body + f"<script type=\"application/json\" id=\"ui-conf\">{embed(conf)}</script>",
                script=False, extra_script=UI_SCRIPT)


# the report route's errors: the JSON error body of every route (api/app.py documents the others' the same way)
REPORT_ERRORS = {code: ResponseSpec(data_container=schemas.ErrorBody, description=text, generate_examples=False)
                 for code, text in ((400, "Bad ranking option in the query: detail says `<field>: <what was expected>`"),
                                    (404, "No such run in the catalog"),
                                    (500, "Unexpected server error (details in the server log only)"))}


def report_query_parameters(settings: ApiSettings) -> list[dict[str, Any]]:
    """The report route's query parameters as OpenAPI states them: the ranking options, each with the
    schema (choices, bounds, default) of the same field in ``POST /v1/runs/{run_id}/rank``'s body under
    this server's limits. A query value is never null, and a list is comma-separated
    (``restrict_features=3,7``: form style, not exploded), as the route reads them."""
    (ref,), components = msgspec.json.schema_components([schemas.rank_body(settings)])
    fields = components[ref["$ref"].rsplit("/", 1)[-1]]["properties"]
    params = []
    for name in RERANK_FIELDS:
        spec = dict(fields[name])
        value = next((m for m in spec.pop("anyOf", []) if m.get("type") != "null"), {})
        spec = {**value, **spec}
        if spec.get("default", 0) is None:
            del spec["default"]
        param = {"name": name, "in": "query", "required": False, "description": spec.pop("description", ""),
                 "schema": spec}
        if spec.get("type") == "array":
            param.update(style="form", explode=False)
        params.append(param)
    return params


def _operation_with(params: list[dict[str, Any]]) -> type[Operation]:
    """An OpenAPI operation that also lists ``params``: the report route reads its query string itself
    (to refuse an option that is not a ranking option), so Litestar cannot derive them from its signature."""

    class QueryOperation(Operation):
        def to_schema(self) -> dict[str, Any]:
            out = super().to_schema()
            out["parameters"] = [*out.get("parameters", []), *params]
            return out

    return QueryOperation


def html_response(text: str) -> Response:
    return Response(content=text, media_type=MediaType.HTML)


def report_routes(svc: ApiService) -> list[ControllerRouterHandler]:
    RunId = Annotated[str, Parameter(description="a run id or a unique prefix of at least 6 hex characters",
                                     min_length=1, max_length=64)]

    @get("/v1/runs/{run_id:str}/report", sync_to_thread=True, tags=["runs"], media_type=MediaType.HTML,
         responses=REPORT_ERRORS, operation_class=_operation_with(report_query_parameters(svc.settings)),
         summary="A stored run as a self-contained HTML report (the CLI's `runs report`)")
    def run_report_html(run_id: RunId, request: Request) -> Response:
        """Ranked with the ranking options given as query parameters (score_mode, return_top_x, ...)."""
        query = dict(request.query_params.items())
        bad = sorted(set(query) - set(RERANK_FIELDS))
        if bad:
            raise RequestError(bad[0], f"not a ranking option; a report can be ranked with {', '.join(RERANK_FIELDS)}")
        refuse_repeated_query(request, RERANK_FIELDS)  # a list option is one comma-separated value too
        # this server's limits, as the route's OpenAPI parameters state them; an empty list is no filter
        known = {o.name: schemas.capped(o, svc.settings) for o in options(DiscoverRequest)}
        opts = {k: check_value(known[k], [x for x in v.split(",") if x.strip()] if known[k].kind.endswith("list") else v)
                for k, v in query.items()}
        result = svc.rank(run_id, {"attach_examples": True, "attach_proto_labels": True, **opts})
        return html_response(run_report(svc.catalog, result))

    @get("/", sync_to_thread=False, include_in_schema=False, media_type=MediaType.HTML)
    def ui() -> Response:
        return html_response(index_page(svc))

    return [run_report_html, ui]


__all__ = ["index_page", "report_routes"]
