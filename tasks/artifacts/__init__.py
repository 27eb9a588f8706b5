"""The on-disk formats one stage hands to the next, read and written in one place each.

Stages never import each other (tests/test_layering.py checks it): what they share is a file,
and its layout lives here.

    dataset            processed / synthetic / released dataset folders (images + manifest)
    diffusion_model    the trained diffusion model folder (model.pt + train_summary.json)
    classifier_folder  one trained classifier (model.pt, model.json, predictions.parquet)
    audit_output       the audit's output folder and its released set
    validation_report  reports/validation.json and the headline table read from it
    dvc_hash           DVC 3 directory hashes (the dataset digests recorded as lineage)

This package imports only ``models``, ``tasks.common`` and ``tasks.config``.
"""
