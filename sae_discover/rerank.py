"""Stored runs without the model: show one, or rank it again with other ranking options."""

from __future__ import annotations

import json

from catalog import store
from catalog.db import Catalog
from sae_discover.request import RequestError, build_request

RANKING_FIELDS = ("return_top_x", "score_mode", "min_coverage_pct", "merge_across_layers", "attach_examples",
                  "attach_proto_labels", "tau", "tau_quantile", "spans_per_feature", "span_window")


def _stored(catalog: Catalog, run_id: str) -> dict:
    run = store.find_run(catalog, run_id)
    if run is None:
        raise RequestError("run_id", f"no run {run_id!r} in {catalog.path}")
    return run


def show_run(catalog: Catalog, run_id: str) -> dict:
    run = _stored(catalog, run_id)
    run["saes"] = store.run_saes(catalog, run["run_key"])
    return run


def rerank(catalog: Catalog, run_id: str, options: dict) -> dict:
    """Rank a stored run again; only ranking options may change (they never create a new run)."""
    from sae_discover.service import Discovery, response

    bad = sorted(set(options) - set(RANKING_FIELDS))
    if bad:
        raise RequestError(bad[0], f"not a ranking option; a stored run can be re-ranked with {', '.join(RANKING_FIELDS)}")
    run = _stored(catalog, run_id)
    req = build_request({"model_id": run["model_id"], "sae_id": run["sae_id"],
                         **({"text": run["text"]} if run["text"] is not None else {"prompt": run["prompt"]}),
                         "restrict_features": json.loads(run["restrict_features"] or "[]"), **options})
    saes = [store.SAEInfo(s["sae_id"], s["layer"], s["stream"], s["fingerprint"], s["hook_name"] or "",
                          s["architecture"] or "", s["d_in"] or 0, s["d_sae"] or 0)
            for s in store.run_saes(catalog, run["run_key"])]
    (ranked,) = Discovery.rank_stored(catalog, [(run["run_key"], run["n_kept"])], saes, req)
    return response(req, run_id, {**run, "cached": True}, json.loads(run["layers"]), json.loads(run["streams"]), ranked,
                    [])
