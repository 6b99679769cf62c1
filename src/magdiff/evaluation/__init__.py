"""Evaluation for magdiff: the exact, model-free oracle scorer (:mod:`magdiff.evaluation.oracle`)."""
