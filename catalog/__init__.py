"""The feature catalog: DuckDB through SQLAlchemy. The only package that knows the schema and writes SQL.

It never imports torch: ingest hands it plain columnar batches (pyarrow tables).
"""
