"""Ingest stage: DICOM archive + labels CSV to a validated, de-identified, normalised dataset."""
