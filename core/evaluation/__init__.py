"""Metrics, scoring in the original geometry, fold and cross-validation reports."""
