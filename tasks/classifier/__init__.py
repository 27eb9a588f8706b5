"""The train_classifier stage: downstream diagnostic models per task and training regime."""
