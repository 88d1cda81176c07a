"""Stored runs without the model: rank them in SQL (discovery's last steps), show one, rank one or several again.

Torch-free: ``runs show`` and ``runs rank`` never load a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from catalog import runs
from catalog.db import Catalog
from catalog.errors import CatalogError, listed
from catalog.ranking import RankOptions, rank_runs
from catalog.writes import SAEInfo
from sae_discover.errors import RequestError
from sae_discover.request import RERANK_FIELDS, DiscoverRequest, build_request, check_restrict_features
from sae_discover.response import discovery_response


def rank_options(req: DiscoverRequest, background: list[int] | None = None) -> RankOptions:
    """The request's ranking options (they never change a run), the restrict set it was made with, and
    selectivity's background runs (their run keys) when it has one."""
    opts = RankOptions(**{f.name: getattr(req, f.name) for f in fields(RankOptions) if hasattr(req, f.name)})
    if background is not None:
        opts.background_runs = background
    return opts


def rank_stored(catalog: Catalog, run_keys: list[int], saes: list[SAEInfo], req: DiscoverRequest,
                background: list[int] | None = None, contrast: Sequence[int] = ()) -> list[dict]:
    """Rank stored runs (their run keys) in SQL, all with ``req``'s ranking options: one dict per run
    with its ranked feature rows, ``threshold_source`` and ``normalization``. ``contrast``: more runs a
    batch background contrasts them with (scored, not returned)."""
    return rank_runs(catalog, run_keys, runs.sae_keys_of(catalog, saes), rank_options(req, background), contrast)


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
    _check_rerank_options(options)
    (result,) = rerank_runs(catalog, [stored_run(catalog, run_id)], options)
    return result


def select_runs(catalog: Catalog, run_ids: Sequence[str] = (), tags: Sequence[tuple[str, str]] = (),
                batch_ids: Sequence[str] = (), model_id: str | None = None, sae_id: str | None = None,
                mode: str | None = None) -> list[dict]:
    """The stored runs to rank together: ``run_ids`` (ids or unique prefixes, in their order) and the
    runs matching a selection with the filters of ``runs list`` (``tags``, ``model_id``, ``sae_id``,
    ``mode``; ``batch_ids``: any of them), oldest first; each run once. An unknown id, no run id and no
    selection, or a selection that matches no run is an error naming its field."""
    filters = {"tag": tags, "batch_id": batch_ids, "model_id": model_id, "sae_id": sae_id, "mode": mode}
    given = [name for name, value in filters.items() if value]
    if not run_ids and not given:
        raise RequestError("run_ids", "give one or more run ids, or select runs with tag, batch_id, model_id, "
                                      "sae_id or mode")
    ids = []
    for run_id in run_ids:
        try:
            ids.append(runs.resolve_run_id(catalog, run_id))
        except CatalogError as exc:  # UnknownRun (a 404 on the API) stays one
            raise type(exc)("run_ids", exc.message) from None
    if given:
        selected = runs.select_run_ids(catalog, model_id, sae_id, mode, tags, batch_ids)
        if not selected:
            shown = [f"tag {k}={v}" for k, v in tags] + [f"batch_id {' '.join(batch_ids)}"] * bool(batch_ids) \
                + [f"{name} {filters[name]}" for name in ("model_id", "sae_id", "mode") if filters[name]]
            raise CatalogError(given[0], f"no stored run matches {' and '.join(shown)}")
        ids += selected
    found = runs.find_runs(catalog, list(dict.fromkeys(ids)))
    return [found[i] for i in dict.fromkeys(ids)]


def _check_rerank_options(options: dict) -> None:
    bad = sorted(set(options) - set(RERANK_FIELDS))
    if bad:
        raise RequestError(bad[0], f"not a ranking option; a stored run can be re-ranked with {', '.join(RERANK_FIELDS)}")


def _run_request(run: dict, options: dict) -> DiscoverRequest:
    """The request that ranks a stored run with ``options`` (None values: the defaults). Its restrict
    set stays the run's own unless ``options`` give one ([] means every stored feature, as in a run)."""
    options = {"restrict_features": run["restrict_features"], **{k: v for k, v in options.items() if v is not None}}
    if not options["restrict_features"]:
        options["restrict_features"] = run["restrict_features"]
    return build_request({"model_id": run["model_id"], "sae_id": run["sae_id"],
                          **({"text": run["text"]} if run["text"] is not None else {"prompt": run["prompt"]}),
                          **options})


def _run_sae_infos(catalog: Catalog, run_key: int) -> tuple[SAEInfo, ...]:
    return tuple(SAEInfo(s["sae_id"], s["layer"], s["stream"], s["fingerprint"], s["hook_name"] or "",
                         s["architecture"] or "", s["d_in"] or 0, s["d_sae"] or 0)
                 for s in runs.run_saes(catalog, run_key))


def _say_lone_runs(stored: list[dict], groups: list[tuple[tuple, list[int]]]) -> None:
    """``background: batch`` over runs that fall into several groups (another model, other SAEs or
    another restrict set): a run alone in its group has nothing to be contrasted with; name it and why."""
    for key, members in groups:
        if len(members) == 1:  # compared with the largest other group (every group may be a single run)
            other_key, others = max((g for g in groups if g[0] != key), key=lambda g: len(g[1]))
            what = [name for name, mine, theirs in zip(("model", "SAEs", "restrict set"), key, other_key, strict=True)
                    if mine != theirs]
            whom = "the others" if len(others) > 1 else f"run {stored[others[0]]['run_id']}"
            raise RequestError("background", f"batch contrasts runs of the same model, SAEs and restrict set; run "
                                             f"{stored[members[0]]['run_id']} was made with a different "
                                             f"{' and '.join(what)} from {whom} and is alone in its group — "
                                             "leave it out or rank it with background calibration")


def rerank_runs(catalog: Catalog, stored: list[dict], options: dict) -> list[dict]:
    """Rank stored runs (their ``runs`` rows) again with the same ranking options, one response each,
    in order. Runs of the same model, SAEs and restrict set are ranked together, as batch mode groups
    a batch's runs, so ``background: batch`` contrasts each with the others of its group."""
    _check_rerank_options(options)
    reqs = [_run_request(run, options) for run in stored]
    saes = {run["run_key"]: _run_sae_infos(catalog, run["run_key"]) for run in stored}
    for run, req in zip(stored, reqs, strict=True):
        check_restrict_features(req.restrict_features, saes[run["run_key"]])
    groups: dict[tuple, list[int]] = {}
    for i, (run, req) in enumerate(zip(stored, reqs, strict=True)):
        groups.setdefault((run["model_id"], saes[run["run_key"]], tuple(req.restrict_features)), []).append(i)
    if reqs and reqs[0].background == "batch" and len(groups) > 1:
        _say_lone_runs(stored, list(groups.items()))
    ranked: list[dict] = [{}] * len(stored)
    for (_, group_saes, _), members in groups.items():
        out = rank_stored(catalog, [stored[i]["run_key"] for i in members], list(group_saes), reqs[members[0]])
        for i, r in zip(members, out, strict=True):
            ranked[i] = r
    texts = runs.run_texts(catalog, [run["run_key"] for run in stored])
    return [discovery_response(req, run["run_id"], {**run, "cached": True}, run["layers"], run["streams"], r,
                               _never_stored(run, req), analyzed=texts.get(run["run_key"]))
            for req, run, r in zip(reqs, stored, ranked, strict=True)]


def _never_stored(run: dict, req: DiscoverRequest) -> list[str]:
    """A warning when a ranking asks for features a run made with a restrict set never stored (its
    ranking then lacks them without a word)."""
    made = set(run["restrict_features"] or [])
    outside = sorted(set(req.restrict_features) - made) if made else []
    if not outside:
        return []
    return [f"restrict_features: run {run['run_id']} was made with restrict_features "
            f"{', '.join(map(str, sorted(made)))}: features {listed(outside, 10)} were never stored (run the text "
            "again without the restrict set to rank them)"]
