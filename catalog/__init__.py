"""The feature catalog: DuckDB through SQLAlchemy. The only package that knows the schema and writes SQL.

It never imports torch: ingest hands it plain columnar batches (pyarrow tables).

- ``db``: open a catalog file (migrated to head), raw cursors; ``errors``: its errors, field as data;
- ``schema``: the tables; ``writes``: runs and labels in one transaction each, key look-ups;
- ``runs``: reading stored runs (look-ups, the listing, a run's detail, health ping);
- ``stats``: calibrations and feature statistics, lite labels; ``ranking``: the scoring SQL;
- ``drift``: base-vs-tuned comparisons; ``labels``: label file parsing (no SQL);
- ``sandbox``: user-written SQL on a read-only, locked-down connection.
"""
