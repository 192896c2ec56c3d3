"""Data: the Parquet contract, readers, validation, text templates, examples and tokens."""
