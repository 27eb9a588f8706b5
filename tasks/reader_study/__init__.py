"""The reader study: a visual Turing test of the released synthetic set, served as a web app.

Not a pipeline stage: ``synthdx reader-study create`` draws a study from the audit's released set
and the de-identified real held-out images, ``serve`` lets readers answer it in a browser,
``report`` scores their answers and logs them to MLflow beside the audit. It reads other stages'
outputs only through tasks/artifacts.
"""
