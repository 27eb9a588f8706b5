"""The audit stage: quality and privacy of the synthetic dataset (see pipeline.run_audit)."""
