"""Stage drift: each ingest's sites against the data the current champion was trained on."""
