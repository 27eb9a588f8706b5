"""The end-to-end pipeline: stages read from dvc.yaml, run one process each, lineage, summary."""
