"""The catalog on real DuckDB files: migrations, views, atomic run writes, exact calibration statistics."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from alembic import command
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog import stats, writes
from catalog.db import Catalog, alembic_config
from catalog.errors import CatalogError

VIEW_COLUMNS = {
    "v_runs": ["run_id", "model_id", "sae_id", "mode", "prompt", "text", "generate", "gen_tokens", "seed", "created_at",
               "n_tokens"],
    "v_tokens": ["run_id", "position", "token_id", "token", "is_generated", "kept"],
    "v_activations": ["run_id", "position", "layer", "stream", "sae_id", "feature_id", "act"],
    "v_feature_stats": ["sae_id", "layer", "stream", "feature_id", "p95", "mean", "max", "density", "n_tokens",
                        "p95_all"],
    "v_labels": ["sae_id", "feature_id", "label", "source", "score", "layer", "stream", "sae_key", "calibration_id"],
    "v_top_contexts": ["run_id", "layer", "stream", "sae_id", "feature_id", "position", "act", "token", "n_fired",
                       "rank"],
}
MODEL = writes.ModelInfo("m", "fp-m", "gpt2", 2, 8)


def sae_info(d_sae: int = 8, layer: int = 0) -> writes.SAEInfo:
    return writes.SAEInfo("s", layer, "resid_pre", f"fp-{d_sae}", f"blocks.{layer}.hook_resid_pre", "standard", 8, d_sae)


def view_columns(con, view: str) -> list[str]:
    return [d[0] for d in con.execute(f"SELECT * FROM {view} LIMIT 0").description]


def test_migrations_up_down_up_keep_the_public_views(tmp_path):
    path = tmp_path / "m.duckdb"
    Catalog(path).close()  # upgrade head
    cfg = alembic_config(f"duckdb:///{path}")
    command.downgrade(cfg, "base")
    con = duckdb.connect(str(path))
    left = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert left == {"alembic_version"}
    con.close()
    command.upgrade(cfg, "head")
    con = duckdb.connect(str(path), read_only=True)
    for view, cols in VIEW_COLUMNS.items():
        assert view_columns(con, view)[: len(cols)] == cols


def _run(run_id: str, n: int = 3) -> dict:
    return {"run_id": run_id, "model_id": "m", "sae_id": "s", "mode": "text", "prompt": None, "text": "abc",
            "generate": False, "gen_tokens": 0, "seed": 42, "layers": [0], "streams": ["resid_pre"],
            "restrict_features": [], "n_tokens": n, "n_kept": n - 1, "timings": {}}


def _tokens(n: int = 3) -> pa.Table:
    return pa.table({"position": pa.array(range(n), pa.int32()), "token_id": pa.array(range(n), pa.int32()),
                     "token": [f"t{i}" for i in range(n)], "is_generated": [False] * n,
                     "is_special": [i == 0 for i in range(n)], "kept": [i > 0 for i in range(n)],
                     "proxy": [0.0] * n})


def _acts(rows) -> pa.Table:
    pos, idx, feat, act = zip(*rows, strict=True) if rows else ([], [], [], [])
    return pa.table({"position": pa.array(pos, pa.int32()), "sae_index": pa.array(idx, pa.int16()),
                     "feature_id": pa.array(feat, pa.int32()), "act": pa.array(act, pa.float32())})


def test_a_run_is_written_whole_and_visible_in_the_views(catalog):
    key, created = writes.write_run(catalog, _run("r1"), MODEL, [sae_info()], _tokens(), _acts([(1, 0, 3, 0.5),
                                                                                                 (2, 0, 5, 1.5)]))
    assert created
    again, created = writes.write_run(catalog, _run("r1"), MODEL, [sae_info()], _tokens(), _acts([]))
    assert again == key and not created
    con = catalog.raw()
    assert con.execute("SELECT position, layer, stream, sae_id, feature_id, act FROM v_activations ORDER BY position"
                       ).fetchall() == [(1, 0, "resid_pre", "s", 3, 0.5), (2, 0, "resid_pre", "s", 5, 1.5)]
    assert con.execute("SELECT count(*) FILTER (WHERE kept), count(*) FROM v_tokens").fetchone() == (2, 3)


def test_a_failing_write_leaves_nothing(catalog):
    broken = pa.table({"position": pa.array([1], pa.int32()), "sae_index": pa.array([0], pa.int16()),
                       "feature_id": pa.array([1], pa.int32()), "act": pa.array([1.0], pa.float32()),
                       "no_such_column": [1]})
    with pytest.raises(duckdb.Error):
        writes.write_run(catalog, _run("bad"), MODEL, [sae_info()], _tokens(), broken)
    con = catalog.raw()
    for table in ("runs", "tokens", "activations", "run_saes", "models", "saes"):
        assert con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table


def test_a_group_of_runs_is_written_whole_run_by_run(catalog, tmp_path):
    """write_runs (batch mode's group commit) stores exactly what one write_run per run stores."""
    two = sae_info(8, 1)
    runs = [("g1", [sae_info(), two], [(1, 0, 3, 0.5), (2, 1, 4, 0.75)]),  # sae_index 0 = layer 0, 1 = layer 1
            ("g2", [two, sae_info()], [(2, 0, 5, 1.5), (2, 1, 0, 0.25)]),  # the other way round
            ("g3", [two], [(1, 0, 6, 2.0)]), ("g4", [sae_info()], [])]
    written = writes.write_runs(catalog, [writes.RunRows(_run(rid), MODEL, saes, _tokens(), _acts(rows))
                                         for rid, saes, rows in runs] + [writes.RunRows(_run("g1"), MODEL, [sae_info()],
                                                                                       _tokens(), _acts([]))])
    assert [created for _, created in written] == [True, True, True, True, False]  # a repeat keeps its first row
    assert len({key for key, _ in written}) == 4 and written[4][0] == written[0][0]
    one_by_one = Catalog(tmp_path / "one.duckdb")
    for rid, saes, rows in runs:
        writes.write_run(one_by_one, _run(rid), MODEL, saes, _tokens(), _acts(rows))
    query = ("SELECT run_id, position, layer, feature_id, act FROM v_activations ORDER BY ALL",
             "SELECT run_id, position, token, kept FROM v_tokens ORDER BY ALL",
             "SELECT r.run_id, count(*) FROM run_saes JOIN runs r USING (run_key) GROUP BY ALL ORDER BY ALL",
             "SELECT run_id, n_tokens, n_kept, layers FROM runs ORDER BY run_id")
    con, ref = catalog.raw(), one_by_one.raw()
    for sql in query:
        assert con.execute(sql).fetchall() == ref.execute(sql).fetchall(), sql
    assert con.execute("SELECT run_id, position, layer, feature_id FROM v_activations ORDER BY ALL").fetchall() == [
        ("g1", 1, 0, 3), ("g1", 2, 1, 4), ("g2", 2, 0, 0), ("g2", 2, 1, 5), ("g3", 1, 1, 6)]
    again = writes.write_runs(catalog, [writes.RunRows(_run("g2"), MODEL, [sae_info()], _tokens(), _acts([]))])
    assert again == [(written[1][0], False)]
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 4


def test_a_failing_group_leaves_none_of_its_runs(catalog):
    tokens = _tokens()
    broken = tokens.set_column(1, "token_id", pa.array([0, None, 2], pa.int32()))  # NOT NULL in the schema
    with pytest.raises(duckdb.ConstraintException):
        writes.write_runs(catalog, [writes.RunRows(_run("ok"), MODEL, [sae_info()], tokens, _acts([(1, 0, 2, 0.5)])),
                                   writes.RunRows(_run("bad"), MODEL, [sae_info()], broken, _acts([]))])
    con = catalog.raw()
    for table in ("runs", "tokens", "activations", "run_saes", "models", "saes"):
        assert con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
    key, created = writes.write_run(catalog, _run("ok"), MODEL, [sae_info()], _tokens(), _acts([(1, 0, 2, 0.5)]))
    assert created and con.execute("SELECT count(*) FROM activations WHERE run_key = ?", [key]).fetchone()[0] == 1


def active_percentile(dense: np.ndarray, pct: float) -> np.ndarray:
    """numpy's percentile of each column's nonzero values (the firing distribution); 0 for a column
    that is all zeros (a feature that never fired)."""
    return np.array([np.percentile(col[col > 0], pct) if (col > 0).any() else 0.0 for col in dense.T])


def _calibrate(catalog: Catalog, dense: np.ndarray, q: float = 0.95) -> int:
    n, d = dense.shape
    tokens = pa.table({"doc": pa.array(np.zeros(n, np.int32)), "position": pa.array(np.arange(1, n + 1, dtype=np.int32)),
                       "token_id": pa.array(np.arange(n, dtype=np.int32)), "token": [f"t{i}" for i in range(n)]})
    rows, cols = np.nonzero(dense)
    acts = pa.table({"doc": pa.array(np.zeros(len(rows), np.int32)), "position": pa.array((rows + 1).astype(np.int32)),
                     "sae_index": pa.array(np.zeros(len(rows), np.int16)), "feature_id": pa.array(cols.astype(np.int32)),
                     "act": pa.array(dense[rows, cols].astype(np.float32))})
    return stats.write_calibration(catalog, MODEL, [sae_info(d)], "corpus", "h", 1, tokens, acts, q)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 12), density=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_calibration_stats_equal_numpy_on_the_dense_matrix(tmp_path_factory, n, d, density, seed):
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n, d)) < density, rng.integers(1, 6, (n, d)) * 0.25, 0).astype(np.float32)
    dense[:, 0] = 0  # a never-active feature, always
    cat = Catalog(tmp_path_factory.mktemp("cal") / "c.duckdb")
    try:
        _calibrate(cat, dense)
        got = np.array(cat.raw().execute("SELECT feature_id, p95, mean, max, density, n_tokens, p95_all "
                                         "FROM v_feature_stats ORDER BY feature_id").fetchall())
    finally:
        cat.close()
    ref = dense.astype(np.float64)
    np.testing.assert_array_equal(got[:, 0], np.arange(d))
    np.testing.assert_allclose(got[:, 1], active_percentile(ref, 95), rtol=1e-9, atol=1e-12)  # tau_basis active
    np.testing.assert_allclose(got[:, 6], np.percentile(ref, 95, axis=0), rtol=1e-9, atol=1e-12)  # all, zeros in
    np.testing.assert_allclose(got[:, 2], ref.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[:, 3], ref.max(0))
    np.testing.assert_allclose(got[:, 4], (ref > 0).mean(0))
    assert (got[:, 5] == n).all()
    assert got[0, 1:7].tolist() == [0, 0, 0, 0, n, 0]


def test_duckdb_quantile_cont_agrees_with_our_sparse_quantile(catalog):
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((200, 4)) < 0.3, rng.random((200, 4)), 0).astype(np.float32)
    _calibrate(catalog, dense)
    con = catalog.raw()
    con.register("dense_tbl", pa.table({f"f{i}": dense[:, i].astype(np.float64) for i in range(4)}))
    expected = con.execute("SELECT " + ", ".join(f"quantile_cont(f{i}, 0.95)" for i in range(4)) + " FROM dense_tbl"
                           ).fetchone()
    active = con.execute("SELECT " + ", ".join(f"quantile_cont(f{i}, 0.95) FILTER (WHERE f{i} > 0)" for i in range(4))
                         + " FROM dense_tbl").fetchone()
    rows = con.execute("SELECT p95_all, p95 FROM v_feature_stats ORDER BY feature_id").fetchall()
    np.testing.assert_allclose([r[0] for r in rows], expected, rtol=1e-7)
    np.testing.assert_allclose([r[1] for r in rows], active, rtol=1e-7)


def _old_calibration(path, dense: np.ndarray) -> None:
    """A catalog as revision 0001 wrote it: a run, and a calibration whose ``p95`` is the all-token P95
    (the rule before revision 0002), its statistics inserted as the old code stored them."""
    cfg = alembic_config(f"duckdb:///{path}")
    command.upgrade(cfg, "0001")
    old = Catalog(path, migrate=False)
    try:
        writes.write_run(old, _run("r1", 4), MODEL, [sae_info(dense.shape[1])], _tokens(4),
                         _acts([(1, 0, 2, 0.5), (2, 0, 2, 2.5), (3, 0, 3, 0.25)]))
        con = old.raw()
        (model_key,) = con.execute("SELECT model_key FROM models").fetchone()
        (sae_key,) = con.execute("SELECT sae_key FROM saes").fetchone()
        n, d = dense.shape
        (cal,) = con.execute("INSERT INTO calibrations (model_key, corpus, corpus_hash, n_docs, n_tokens) "
                             "VALUES (?, 'corpus', 'h', 1, ?) RETURNING calibration_id", [model_key, n]).fetchone()
        con.execute("INSERT INTO calibration_saes VALUES (?, ?)", [cal, sae_key])
        rows, cols = np.nonzero(dense)
        con.register("cal_acts", pa.table({"doc": np.zeros(len(rows), np.int32), "position": (rows + 1).astype(np.int32),
                                            "feature_id": cols.astype(np.int32), "act": dense[rows, cols]}))
        con.execute(f"INSERT INTO calibration_activations SELECT {cal}, {sae_key}, doc, position, feature_id, act "
                    "FROM cal_acts")
        ref = dense.astype(np.float64)
        con.register("old_stats", pa.table({"feature_id": np.arange(d, dtype=np.int32),
                                            "p95": np.percentile(ref, 95, axis=0), "mean": ref.mean(0),
                                            "max": ref.max(0), "density": (ref > 0).mean(0)}))
        con.execute(f"INSERT INTO feature_stats SELECT {cal}, {sae_key}, feature_id, p95, mean, max, density, {n} "
                    "FROM old_stats")
    finally:
        old.close()


def test_migration_0002_keeps_both_p95s_of_an_existing_calibration(tmp_path):
    """Upgrading a 0001 catalog moves the old all-token p95 to p95_all and recomputes p95 on the
    firing distribution from the stored calibration codes; runs are untouched; downgrade restores it."""
    path = tmp_path / "old.duckdb"
    rng = np.random.default_rng(5)
    firing_rate = np.array([0, 0, 0, 0, 0.3, 0.5])  # features 4, 5 fire often (all-token P95 > 0)
    dense = np.where(rng.random((60, 6)) < firing_rate, rng.random((60, 6)) * 2 + 0.1, 0).astype(np.float32)
    dense[[0, 1, 9], 2:4] = [[0.7, 1.1], [0.9, 0], [0, 0.4]]  # features 2, 3 fire twice (all-token P95 = 0)
    dense[:, 1] = 0
    dense[7, 1] = 1.5  # fired once
    ref = dense.astype(np.float64)
    _old_calibration(path, dense)
    query = "SELECT feature_id, p95, mean, max, density, n_tokens FROM v_feature_stats ORDER BY feature_id"
    con = duckdb.connect(str(path))
    before = np.array(con.execute(query).fetchall())
    run_rows = con.execute("SELECT * FROM v_activations ORDER BY ALL").fetchall()
    con.close()
    np.testing.assert_allclose(before[:, 1], np.percentile(ref, 95, axis=0), rtol=1e-12)
    assert before[:4, 1].tolist() == [0] * 4 and (before[4:, 1] > 0).all()  # the old rule: 0 for sparse features

    cat = Catalog(path)  # upgrade head
    try:
        con = cat.raw()
        after = np.array(con.execute(query.replace("n_tokens", "n_tokens, p95_all")).fetchall())
        np.testing.assert_allclose(after[:, 1], active_percentile(ref, 95), rtol=1e-9)
        np.testing.assert_allclose(after[:, 6], before[:, 1], rtol=0)
        np.testing.assert_array_equal(after[:, [0, 2, 3, 4, 5]], before[:, [0, 2, 3, 4, 5]])
        assert after[0, 1] == 0 and after[1, 1] == pytest.approx(1.5) and (after[2:, 1] > 0).all()
        assert [r[:7] for r in con.execute("SELECT * FROM v_activations ORDER BY ALL").fetchall()] == run_rows  # + attr (0003)
        keys = writes.sae_keys(con, [sae_info(6)])
        from catalog import ranking

        (run_key,) = con.execute("SELECT run_key FROM runs").fetchone()
        # the run: feature 2 at 0.5 and 2.5, feature 3 at 0.25, over 3 analysed tokens; τ active: feature 2
        # P95 of (0.7, 0.9) = 0.89, feature 3 of (0.4, 1.1) = 1.065; τ all: 0 for both (two nonzeros in 60)
        for basis, source, coverage in (("active", "calibration_p95", {2: 1 / 3, 3: 0.0}),
                                         ("all", "calibration_p95_all", {2: 2 / 3, 3: 1 / 3})):
            got = ranking.rank_run(cat, run_key, keys, ranking.RankOptions(
                tau_basis=basis, min_coverage_pct=0, attach_examples=False, attach_proto_labels=False))
            assert got["threshold_source"] == source
            assert {f["feature_id"]: f["coverage"] for f in got["features"]} == pytest.approx(coverage)
    finally:
        cat.close()

    cfg = alembic_config(f"duckdb:///{path}")
    command.downgrade(cfg, "0001")
    con = duckdb.connect(str(path))
    assert "p95_all" not in [r[0] for r in con.execute("DESCRIBE feature_stats").fetchall()]
    assert view_columns(con, "v_feature_stats")[:9] == VIEW_COLUMNS["v_feature_stats"][:9]
    np.testing.assert_array_equal(np.array(con.execute(query).fetchall()), before)
    assert con.execute("SELECT * FROM v_activations ORDER BY ALL").fetchall() == run_rows
    con.close()
    command.upgrade(cfg, "head")
    con = duckdb.connect(str(path), read_only=True)
    again = np.array(con.execute(query.replace("n_tokens", "n_tokens, p95_all")).fetchall())
    np.testing.assert_array_equal(again, after)


def test_migration_0010_records_run_targets_and_downgrades(tmp_path):
    """Upgrading a 0009 catalog: a run without attributions gets target none, one with attributions
    NULL (its target was never recorded); v_runs shows the column. Downgrade drops it and keeps the run
    id's unique index."""
    path = tmp_path / "old.duckdb"
    cfg = alembic_config(f"duckdb:///{path}")
    command.upgrade(cfg, "0009")
    old = Catalog(path, migrate=False)
    try:
        writes.write_run(old, _run("plain"), MODEL, [sae_info()], _tokens(), _acts([(1, 0, 2, 0.5)]))
        with_attr = _acts([(1, 0, 3, 0.5)]).append_column("attr", pa.array([0.25], pa.float32()))
        writes.write_run(old, _run("used"), MODEL, [sae_info()], _tokens(), with_attr)
    finally:
        old.close()
    command.upgrade(cfg, "head")
    con = duckdb.connect(str(path))
    try:
        assert con.execute("SELECT run_id, attribution_target FROM v_runs ORDER BY run_id").fetchall() == [
            ("plain", "none"), ("used", None)]
    finally:
        con.close()
    command.downgrade(cfg, "0009")
    con = duckdb.connect(str(path))
    try:
        assert "attribution_target" not in view_columns(con, "v_runs")
        assert "attribution_target" not in [d[0] for d in con.execute("SELECT * FROM runs LIMIT 0").description]
        assert con.execute("SELECT index_name FROM duckdb_indexes() WHERE table_name = 'runs'").fetchall() == [
            ("ix_runs_run_id",)]
    finally:
        con.close()


def test_migration_0009_gives_lite_labels_their_calibration(tmp_path):
    """Upgrading a 0008 catalog: the stored lite labels (one per feature, written by the SAE's newest
    calibration, every calibration replaced them) get that calibration's id, imported labels none;
    downgrade keeps each SAE's newest calibration's lite labels only (one per feature, as before)."""
    path = tmp_path / "old.duckdb"
    cfg = alembic_config(f"duckdb:///{path}")
    command.upgrade(cfg, "0008")
    old = Catalog(path, migrate=False)
    try:
        writes.write_run(old, _run("r1"), MODEL, [sae_info(), sae_info(layer=1)], _tokens(), _acts([(1, 0, 2, 0.5)]))
        con = old.raw()
        (model_key,) = con.execute("SELECT model_key FROM models").fetchone()
        keys = [k for (k,) in con.execute("SELECT sae_key FROM saes ORDER BY layer").fetchall()]
        cals = [con.execute("INSERT INTO calibrations (model_key, corpus, corpus_hash, n_docs, n_tokens, created_at) "
                            "VALUES (?, 'c', 'h', 1, 4, ?) RETURNING calibration_id",
                            [model_key, f"2026-11-0{day} 12:00:00"]).fetchone()[0] for day in (1, 2, 4)]
        # the first SAE: calibrations 1 and 2 (its lite labels, made on day 3, are 2's), and 3, made after
        # them without lite labels; the second SAE: only calibration 1
        for cal, key in ((cals[0], keys[0]), (cals[1], keys[0]), (cals[2], keys[0]), (cals[0], keys[1])):
            con.execute("INSERT INTO feature_stats VALUES (?, ?, 0, 1, 0.5, 2, 0.1, 4, 0)", [cal, key])
        con.execute("INSERT INTO labels (sae_key, feature_id, label, source, score, created_at) VALUES "
                    "(?, 0, 'fires on \"a\"', 'lite', NULL, '2026-11-03'), (?, 0, 'imported', 'csv', 0.5, '2026-11-03'), "
                    "(?, 0, 'fires on \"b\"', 'lite', NULL, '2026-11-03')", [keys[0], keys[0], keys[1]])
        con.close()
    finally:
        old.close()
    query = "SELECT sae_key, label, source, calibration_id FROM v_labels ORDER BY ALL"
    Catalog(path).close()  # upgrade head
    con = duckdb.connect(str(path))
    assert con.execute(query).fetchall() == [(keys[0], "fires on \"a\"", "lite", cals[1]),
                                             (keys[0], "imported", "csv", None),
                                             (keys[1], "fires on \"b\"", "lite", cals[0])]
    con.execute("INSERT INTO labels (sae_key, feature_id, label, source, calibration_id) VALUES "
                "(?, 0, 'older', 'lite', ?)", [keys[0], cals[0]])  # another calibration's lite label
    con.close()
    command.downgrade(cfg, "0008")
    con = duckdb.connect(str(path))
    assert "calibration_id" not in [r[0] for r in con.execute("DESCRIBE labels").fetchall()]
    assert view_columns(con, "v_labels") == VIEW_COLUMNS["v_labels"][:-1]
    assert con.execute("SELECT sae_key, label, source FROM v_labels ORDER BY ALL").fetchall() == [
        (keys[0], "fires on \"a\"", "lite"), (keys[0], "imported", "csv"), (keys[1], "fires on \"b\"", "lite")]
    con.close()


def test_reading_runs_listing_detail_keys_and_ping(catalog):
    """catalog.runs: the one run listing (CLI and API), a run's detail, key look-ups, the health ping."""
    from catalog import runs

    assert runs.ping(catalog) == 0 and runs.list_runs(catalog, 10) == ([], 0)
    for rid in ("a1", "a2", "a3"):
        writes.write_run(catalog, {**_run(rid), "model_id": "m2" if rid == "a3" else "m"}, MODEL, [sae_info()],
                         _tokens(), _acts([(1, 0, 3, 0.5)]))
    rows, total = runs.list_runs(catalog, 2)
    assert total == 3 and [r["run_id"] for r in rows] == ["a3", "a2"]  # newest first, ties by the later run
    assert set(rows[0]) == set(runs.LIST_COLUMNS) and rows[0]["layers"] == [0] and rows[0]["streams"] == ["resid_pre"]
    assert rows[0]["created_at"].tzinfo is not None
    assert [r["run_id"] for r in runs.list_runs(catalog, 10, 1, model_id="m")[0]] == ["a1"]
    assert runs.list_runs(catalog, 10, model_id="m", sae_id="nope") == ([], 0)
    with pytest.raises(CatalogError) as info:
        runs.list_runs(catalog, -1)
    assert info.value.field == "limit"
    detail = runs.run_detail(catalog, "a2")
    assert detail["run_id"] == "a2" and detail["created_at"].tzinfo is not None
    assert (detail["restrict_features"], detail["timings"]) == ([], {})
    assert [(s["layer"], s["stream"]) for s in detail["saes"]] == [(0, "resid_pre")]
    assert runs.run_detail(catalog, "absent") is None
    key = runs.model_key(catalog, MODEL.model_id, MODEL.fingerprint)
    assert key is not None and runs.model_key(catalog.raw(), MODEL.model_id, "other") is None
    assert runs.sae_keys_of(catalog, [sae_info()]) == writes.sae_keys(catalog.raw(), [sae_info()])
    with pytest.raises(CatalogError) as info:
        runs.sae_keys_of(catalog, [sae_info(16)])
    assert info.value.field == "sae_id"
    assert runs.ping(catalog) == 3


def test_has_calibration_is_per_model_and_sae_and_writes_nothing(catalog):
    assert not stats.has_calibration(catalog, sae_info(4), MODEL.model_id, MODEL.fingerprint)
    assert catalog.raw().execute("SELECT count(*) FROM saes").fetchone()[0] == 0  # a pure read
    _calibrate(catalog, np.eye(4, dtype=np.float32))
    assert stats.has_calibration(catalog, sae_info(4), MODEL.model_id, MODEL.fingerprint)
    assert not stats.has_calibration(catalog, sae_info(4), MODEL.model_id, "other weights")
    assert not stats.has_calibration(catalog, sae_info(4, layer=1), MODEL.model_id, MODEL.fingerprint)


def test_a_per_hook_ranking_lists_a_layers_hooks_in_the_models_order(catalog):
    """merge_across_layers false: within a layer, resid_pre, attn_out, mlp_out, resid_post — where the
    block reads them — not the streams' alphabetical order; layers ascending."""
    from dataclasses import replace

    from catalog import ranking

    streams = ["resid_post", "mlp_out", "resid_pre", "attn_out"]
    saes = [replace(sae_info(), stream=s, hook_name=f"blocks.0.hook_{s}") for s in streams] + [sae_info(layer=1)]
    acts = [(1, i, 3, 1.0 + i) for i in range(len(saes))]
    key, _ = writes.write_run(catalog, {**_run("r-order"), "layers": [0, 1], "streams": streams}, MODEL, saes,
                              _tokens(), _acts(acts))
    con = catalog.raw()
    keys = writes.sae_keys(con, saes)
    con.close()
    got = ranking.rank_run(catalog, key, keys, ranking.RankOptions(
        merge_across_layers=False, min_coverage_pct=0, attach_examples=False))
    assert [(f["layer"], f["stream"]) for f in got["features"]] == [
        (0, "resid_pre"), (0, "attn_out"), (0, "mlp_out"), (0, "resid_post"), (1, "resid_pre")]


def test_a_per_hook_ranking_names_each_hook_where_nothing_passed(catalog):
    """merge_across_layers false: a hook whose features all miss the gates gets a warning naming it
    (its block would otherwise be missing without a word); merged rankings, where hooks compete, none."""
    from catalog import ranking

    saes = [sae_info(layer=0), sae_info(layer=1)]
    key, _ = writes.write_run(catalog, {**_run("r1"), "layers": [0, 1]}, MODEL, saes, _tokens(),
                              _acts([(1, 1, 3, 0.5), (2, 1, 5, 1.5), (1, 0, 2, 0.25)]))
    con = catalog.raw()
    keys = writes.sae_keys(con, saes)
    con.close()
    said = {}
    for merge in (False, True):
        got = ranking.rank_run(catalog, key, keys, ranking.RankOptions(
            merge_across_layers=merge, min_coverage_pct=0, restrict_features=[3, 5], attach_examples=False))
        assert sorted((f["layer"], f["feature_id"]) for f in got["features"]) == [(1, 3), (1, 5)]
        said[merge] = [w for w in got["warnings"] if w.startswith("min_coverage_pct: ")]
    assert said[True] == []
    assert len(said[False]) == 1 and "no feature of layer 0 resid_pre fired on the analyzed tokens" in said[False][0]
    # a merged ranking left with no feature at all says why (restrict_features names the set it looked in)
    for restrict, which in (([7], " of restrict_features"), ([], "")):
        empty = ranking.rank_run(catalog, key, keys, ranking.RankOptions(
            min_coverage_pct=0 if restrict else 100, restrict_features=restrict, attach_examples=False))
        said = "fired on the analyzed tokens" if restrict else (  # no gate: nothing fired; else: the gate's advice
            "passed the gates (active, above its τ on at least 100% of the analyzed tokens); lower min_coverage_pct "
            "or give tau")
        assert empty["features"] == [] and [w for w in empty["warnings"] if w.startswith("min_coverage_pct: ")] == [
            f"min_coverage_pct: no feature{which} {said}"]
