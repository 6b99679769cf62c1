"""The folder layouts that :mod:`magdiff.evaluation.standard` reads and the extractors it takes, as the help of
``magdiff evaluate folder | davis | dreambooth`` shows them (plain text, no imports: the parser is built cheaply)."""

from __future__ import annotations

__all__ = ["DAVIS_LAYOUT", "DREAMBOOTH_LAYOUT", "EXTRACTOR_HELP", "FOLDER_LAYOUT"]

EXTRACTOR_HELP = {
    "clip": "local CLIP model folder (CLIPModel + tokenizer + preprocessor files, e.g. a copy of "
    "openai/clip-vit-large-patch14): text alignment, frame consistency, CLIP-T, CLIP-I",
    "dino": "local DINO ViT folder (ViTModel/Dinov2Model + preprocessor_config.json, e.g. a copy of "
    "facebook/dino-vits16): DINO subject similarity",
    "i3d": "local TorchScript I3D file (StyleGAN-V's i3d_torchscript.pt, Kinetics-400): FVD",
    "c3d": "local TorchScript C3D file fine-tuned on UCF-101 (StyleGAN-V's c3d_ucf101.pt): video IS",
}
"""What each extractor option (``--clip``, ``--dino``, ``--i3d``, ``--c3d``) takes and which metrics need it."""

_FOOTER = """
Extractors are read from local paths only (nothing is downloaded); a metric whose extractor is not given is
skipped with a note. Metadata paths are relative to the metadata file's folder (or absolute); unknown keys are
ignored. See docs/metrics.md for the definitions and protocols.
"""

FOLDER_LAYOUT = (
    """Score a folder of generated videos with the standard metrics.

Layout:
  VIDEOS/metadata.jsonl (or prompts.jsonl), one JSON object per line:
    {"video": "cat_000.mp4", "prompt": "a cat walking on the beach",
     "subject": "subjects/cat.png", "reference": "real/cat_000.mp4"}
  video (or file_name): a video file or frame folder (required)
  prompt: the text it was made from (text alignment, CLIP-T; optional)
  subject: an image, a folder of images, or a list of them (CLIP-I, DINO; optional)
  reference: a real video for the FVD reference set when --reference is not given (optional)
  Without a metadata file every video file directly inside VIDEOS is scored (no prompts).
  --reference DIR: every video file under DIR (recursively) is a real video for FVD.
"""
    + _FOOTER
)
""":func:`~magdiff.evaluation.standard.read_folder`'s layout."""

DAVIS_LAYOUT = (
    """Score edited DAVIS sequences: textual alignment, frame consistency (CLIP, x100) and the
error inside the kept region.

Layout:
  DAVIS/JPEGImages/480p/<sequence>/00000.jpg ...   (the DAVIS release: --davis DAVIS)
  DAVIS/Annotations/480p/<sequence>/00000.png ...  (optional: the kept-region error)
  VIDEOS/metadata.jsonl, one JSON object per edited video:
    {"video": "blackswan_snow.mp4", "sequence": "blackswan",
     "prompt": "a swan swimming in the snow", "keep": "subject"}
  keep: subject (default: the annotated object was kept) or background.
  Edited frame i is compared with source frame i (what `magdiff edit` produces).
"""
    + _FOOTER
)
""":func:`~magdiff.evaluation.standard.read_davis`'s layout."""

DREAMBOOTH_LAYOUT = (
    """Score videos of DreamBooth subjects: DINO, CLIP-I, CLIP-T (cosines, not x100).

Layout:
  DATASET/<subject>/*.jpg        (the DreamBooth dataset folder: --dataset DATASET)
  VIDEOS/metadata.jsonl, one JSON object per video:
    {"video": "dog6_00.mp4", "subject": "dog6", "prompt": "a dog swimming in a pool"}
  Each frame is compared with every image of its subject; means over frames, then over videos.
"""
    + _FOOTER
)
""":func:`~magdiff.evaluation.standard.read_dreambooth`'s layout."""
