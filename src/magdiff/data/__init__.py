"""Data for magdiff: the synthetic world with exact ground truth (:mod:`magdiff.data.world`)."""
