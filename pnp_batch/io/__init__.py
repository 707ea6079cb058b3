"""Everything that touches storage and tables: the only users of fsspec and pyarrow's file systems.

storage (URIs, atomic writes, retries), conditional (create-if-absent, compare-and-swap) and lease (one
writer per output), manifest (read, validate, group rows by source), rows and
records (a row in, a result record out), images (decode, check, resize, encode), features (the
store of inverted latents), results (Parquet shards, run summaries, the done-index, status).
"""
