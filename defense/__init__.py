"""Detectors, per-client monitoring and output perturbations (never imports ``server``)."""
