"""Data for magdiff: the synthetic world with exact ground truth (:mod:`magdiff.data.world`)."""

# Users' own videos: JSONL/CSV manifests, the training dataset over them, and `magdiff segment-dataset`.
from magdiff.data.manifest import ManifestDataset, ManifestEntry, read_manifest, segment_dataset  # noqa: F401
