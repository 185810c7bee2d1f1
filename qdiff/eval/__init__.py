"""Evaluation: FID/IS via torch-fidelity, feature extractors, figures."""
