"""Orchestration: the pipeline's DAG (from dvc.yaml), scheduler, project lock, lineage, summary.

Why under flows/ and not tasks/: orchestration is not a stage. It runs the stages (each as its
own ``dvc repro`` process) and reads what they leave on disk, so it sits above the stage
packages in the import graph (flows -> tasks -> models), and the stage packages stand side by
side on one level below it.
"""
