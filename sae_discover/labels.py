"""AutoInterp label import: a parsed label file (``catalog.labels``) → the labels of each SAE hook it names.

Each row's hook comes from the file (Neuronpedia's ``layer`` field, delphi's module, CSV columns), else
from ``layer``/``stream`` (which also place rows whose file hook the source has no SAE for), else from the
source when it has one SAE; a file hook the source has that ``layer``/``stream`` contradict is refused.
One transaction for the whole file; it replaces earlier labels of the same source at the hooks it
touches (the result counts them).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from catalog import labels
from catalog.db import Catalog
from catalog.errors import LabelFileError, hooks_text
from ingest.saes.sources import SAESource
from sae_discover.errors import RequestError
from sae_discover.plan import sae_infos


def source_hook(source: SAESource, hook: tuple[int, str] | None) -> tuple[int, str] | None:
    """The source's hook for a hook a label file names: itself, or for resid_post of layer N the
    resid_pre SAE of layer N+1 (the same activations: a block's output is the next block's input).
    A hook the source has no SAE for is refused, listing the hooks it has and the names files may use."""
    if hook is None or hook in source.hooks:
        return hook
    layer, stream = hook
    if stream == "resid_post" and (layer + 1, "resid_pre") in source.hooks:
        return layer + 1, "resid_pre"
    raise RequestError("layer", f"the file names layer {layer} {stream}, and {source.sae_id!r} has no SAE there "
                                f"(it has {hooks_text(source.hooks)}); delphi file names read: "
                                f"{'; '.join(labels.DELPHI_MODULES)}; or give layer and stream (--layer, --stream)")


def _row_hook(source: SAESource, named: tuple[int, str] | None, layer: int | None, stream: str | None
              ) -> tuple[int, str] | None:
    """A row's hook: the one its file names (:func:`source_hook`), else ``layer``/``stream``, which also
    place a row whose named hook the source lacks; a named hook the source has that differs from the
    given one is refused (it would move labels to another SAE without a word)."""
    if layer is None or stream is None:
        return source_hook(source, named)
    if named is None:
        return layer, stream
    try:
        resolved = source_hook(source, named)
    except RequestError:
        return layer, stream
    if resolved != (layer, stream):
        read_by = "" if resolved == named else f" (read by the SAE of layer {resolved[0]} {resolved[1]})"
        raise RequestError("layer", f"the file names layer {named[0]} {named[1]}{read_by} and layer/stream say layer "
                                    f"{layer} {stream}; drop --layer and --stream to use the file's hooks")
    return resolved


def _at(row: labels.LabelRow) -> str:
    """The prefix naming a row of the file in an error (``file:line: ``, or the delphi file), if known."""
    return f"{row.where}: " if row.where else ""


def import_labels(catalog: Catalog, source: SAESource, path: str | Path, fmt: str | None = None,
                  layer: int | None = None, stream: str | None = None, score_type: str | None = None) -> dict:
    """Import an AutoInterp label file for the SAEs of ``source`` (``score_type``: which of a Neuronpedia
    explanation's typed scores is its label's score, :mod:`catalog.labels`)."""
    catalog.require_writable("importing labels")  # before the file is read
    sae_id = source.sae_id
    if (layer is None) != (stream is None):
        raise RequestError("layer" if layer is None else "stream", "give layer and stream together (--layer, --stream)")
    if layer is not None and (layer, stream) not in source.hooks:  # named as given, before the file is read
        missing = "stream" if any(lyr == layer for lyr, _ in source.hooks) else "layer"
        raise RequestError(missing, f"{sae_id!r} has no SAE for layer {layer} {stream}; it has "
                                    f"{hooks_text(source.hooks)}")
    rows = labels.parse(path, fmt, score_type)
    groups: dict[tuple[int, str], list[labels.LabelRow]] = {}
    for row in rows:
        if row.sae is not None and row.sae != sae_id:
            raise LabelFileError("sae", f"{_at(row)}a row of the file names SAE {row.sae!r}; this import is for {sae_id!r} "
                                        "(split the file, or import it once per SAE)")
        try:
            hook = _row_hook(source, row.hook, layer, stream)
        except RequestError as exc:  # about a row of the file: name the row (file:line, or the delphi file)
            raise LabelFileError(exc.field, f"{_at(row)}{exc.message}") from None
        if hook is None:
            if len(source.hooks) != 1:
                accepted = f"; delphi file names read: {'; '.join(labels.DELPHI_MODULES)}" \
                    if row.source == "delphi" else ""
                raise RequestError("layer", f"{_at(row)}the file does not say which hook its labels belong to and "
                                            f"{sae_id!r} has {len(source.hooks)} SAEs; give layer and stream (--layer, --stream)"
                                            f"{accepted}")
            hook = next(iter(source.hooks))
        groups.setdefault(hook, []).append(row)
    batches = []
    for hook, group in sorted(groups.items()):
        (info,) = sae_infos(source, [hook])
        too_big = [r for r in group if r.feature_id >= info.d_sae]
        if too_big:
            raise LabelFileError("feature_id", f"{_at(too_big[0])}{too_big[0].feature_id} is beyond the {info.d_sae} features of "
                                               f"the SAE for layer {hook[0]} {hook[1]}")
        batches.append((info, pa.table({
            "feature_id": pa.array([r.feature_id for r in group], pa.int32()),
            "label": [r.label for r in group], "source": [r.source for r in group],
            "score": pa.array([r.score for r in group], pa.float64())})))
    n, replaced = labels.write_labels(catalog, batches)
    return {"imported": n, "replaced": replaced, "hooks": [list(h) for h in sorted(groups)]}
