"""Counterfactual heat maps from the diffusion model (``synthdx explain``); not a stage."""
