"""What verification by ablation reads back of a stored run: its token ids and each feature's codes.

``verify_top`` reruns the model on a stored run (cached or just made) with one feature removed at a time;
these are the run's own stored tokens and nonzero codes (kept tokens only), so the ablation subtracts
exactly what the ranking measured.
"""

from __future__ import annotations

import numpy as np

from catalog.db import Catalog


def run_sequence(catalog: Catalog, run_key: int) -> tuple[list[int], int]:
    """The run's token ids in order and its prompt length (tokens not generated)."""
    con = catalog.raw()
    try:
        rows = con.execute("SELECT token_id, is_generated FROM tokens WHERE run_key = ? ORDER BY position",
                           [run_key]).fetchall()
    finally:
        con.close()
    return [int(t) for t, _ in rows], sum(1 for _, generated in rows if not generated)


def feature_codes(catalog: Catalog, run_key: int, pairs: list[tuple[int, int]]
                  ) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """(positions, codes) of each ``(sae_key, feature_id)`` in the run, positions ascending."""
    out: dict[tuple[int, int], tuple[list[int], list[float]]] = {p: ([], []) for p in pairs}
    if not pairs:
        return {}
    con = catalog.raw()
    try:
        rows = con.execute(
            "SELECT a.sae_key, a.feature_id, a.position, a.act FROM activations a "
            "SEMI JOIN (SELECT unnest($keys) AS sae_key, unnest($fids) AS feature_id) p "
            "ON p.sae_key = a.sae_key AND p.feature_id = a.feature_id "
            "WHERE a.run_key = $run ORDER BY a.sae_key, a.feature_id, a.position",
            {"keys": [int(k) for k, _ in pairs], "fids": [int(f) for _, f in pairs], "run": run_key}).fetchall()
    finally:
        con.close()
    for key, fid, pos, act in rows:
        out[(int(key), int(fid))][0].append(int(pos))
        out[(int(key), int(fid))][1].append(float(act))
    return {p: (np.asarray(pos, dtype=np.int64), np.asarray(act, dtype=np.float32)) for p, (pos, act) in out.items()}
