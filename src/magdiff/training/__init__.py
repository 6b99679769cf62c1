"""Training loops for the components of the project's own models (trained on the synthetic world)."""
