"""Gradient clipping covers every trained parameter, the text encoder's too when it trains."""

from __future__ import annotations

import accelerate

from magdiff.training.config import config_from_dict, get_preset
from magdiff.training.trainer import train

FAST = {"num_train_samples": 2, "batch_size": 1, "unet_channels": (16, 32), "num_frames": 2, "max_steps": 1}


def test_clipping_covers_the_unet_and_a_trained_text_encoder(tmp_path, monkeypatch):
    clipped: list[set[int]] = []
    original = accelerate.Accelerator.clip_grad_norm_

    def record(self, parameters, *args, **kwargs):
        parameters = list(parameters)
        clipped.append({id(p) for p in parameters})
        return original(self, parameters, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", record)
    trained: dict[str, set[int]] = {}
    import magdiff.training.trainer as trainer_module

    original_model = trainer_module.TrainedModel

    class Spy(original_model):
        def __init__(self, unet, text_encoder=None):
            super().__init__(unet, text_encoder)
            trained["unet"] = {id(p) for p in unet.parameters() if p.requires_grad}
            if text_encoder is not None:
                trained["text_encoder"] = {id(p) for p in text_encoder.parameters()}

    monkeypatch.setattr(trainer_module, "TrainedModel", Spy)
    values = {**FAST, "train_text_encoder": True, "output_dir": str(tmp_path / "run"), "validate_every": 1000}
    train(config_from_dict(values, get_preset("world-tiny")), progress=False)
    assert clipped and trained["text_encoder"]
    assert trained["text_encoder"] <= clipped[-1]  # the text encoder's parameters are clipped with the U-Net's
    assert trained["unet"] <= clipped[-1]
