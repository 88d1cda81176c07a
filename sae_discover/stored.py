"""Stored runs without the model: rank them in SQL (discovery's last steps), show one, rank one again.

Torch-free: ``runs show`` and ``runs rank`` never load a model.
"""

from __future__ import annotations

from dataclasses import fields

from catalog import runs
from catalog.db import Catalog
from catalog.ranking import RankOptions, rank_runs
from catalog.writes import SAEInfo
from sae_discover.errors import RequestError
from sae_discover.request import RERANK_FIELDS, DiscoverRequest, build_request
from sae_discover.response import discovery_response


def rank_options(req: DiscoverRequest, background: tuple[list[int], int] | None = None) -> RankOptions:
    """The request's ranking options (they never change a run), the restrict set it was made with, and
    selectivity's background runs when it has one."""
    opts = RankOptions(**{f.name: getattr(req, f.name) for f in fields(RankOptions) if hasattr(req, f.name)})
    if background is not None:
        opts.background_runs, opts.background_n = background
    return opts


def rank_stored(catalog: Catalog, stored: list[tuple[int, int]], saes: list[SAEInfo], req: DiscoverRequest,
                background: tuple[list[int], int] | None = None) -> list[dict]:
    """Rank stored runs ``(run_key, n_kept)`` in SQL, all with ``req``'s ranking options: one dict per run
    with its ranked feature rows, ``threshold_source`` and ``normalization``."""
    return rank_runs(catalog, stored, runs.sae_keys_of(catalog, saes), rank_options(req, background))


def stored_run(catalog: Catalog, run_id: str) -> dict:
    """A stored run's row by its id or a unique prefix of it (:func:`catalog.runs.resolve_run_id`)."""
    run = runs.find_run(catalog, runs.resolve_run_id(catalog, run_id))
    assert run is not None  # resolve_run_id found it
    return run


def show_run(catalog: Catalog, run_id: str) -> dict:
    """A stored run's detail (:func:`catalog.runs.run_detail`), JSON columns decoded, with its analyzed text."""
    return runs.run_detail(catalog, runs.resolve_run_id(catalog, run_id))  # type: ignore[return-value]


def rerank(catalog: Catalog, run_id: str, options: dict) -> dict:
    """Rank a stored run again; only ranking options may change (they never create a new run).
    ``restrict_features`` filters the stored rows (a run made with a restrict set holds no others)."""
    bad = sorted(set(options) - set(RERANK_FIELDS))
    if bad:
        raise RequestError(bad[0], f"not a ranking option; a stored run can be re-ranked with {', '.join(RERANK_FIELDS)}")
    run = stored_run(catalog, run_id)
    options = {"restrict_features": run["restrict_features"], **{k: v for k, v in options.items() if v is not None}}
    if not options["restrict_features"]:  # [] means every stored feature, as in a run
        options["restrict_features"] = run["restrict_features"]
    req = build_request({"model_id": run["model_id"], "sae_id": run["sae_id"],
                         **({"text": run["text"]} if run["text"] is not None else {"prompt": run["prompt"]}),
                         **options})
    saes = [SAEInfo(s["sae_id"], s["layer"], s["stream"], s["fingerprint"], s["hook_name"] or "",
                    s["architecture"] or "", s["d_in"] or 0, s["d_sae"] or 0)
            for s in runs.run_saes(catalog, run["run_key"])]
    (ranked,) = rank_stored(catalog, [(run["run_key"], run["n_kept"])], saes, req)
    analyzed = runs.run_texts(catalog, [run["run_key"]])[run["run_key"]]
    return discovery_response(req, run["run_id"], {**run, "cached": True}, run["layers"], run["streams"], ranked, [],
                              analyzed=analyzed)
