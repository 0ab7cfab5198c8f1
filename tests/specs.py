"""Model specs that several tests build on."""

from __future__ import annotations

from typing import Any

from common.model_spec import ModelSpec


def scatter_transfer(head_width: int = 8, **overrides: Any) -> ModelSpec:
    """The default run's emotion model family (``simulations/default.toml``): a convolutional head
    on dlib's trunk map after 7 blocks of the 48-pixel face, pooled to 3x3, beside the face's log
    wavelet scattering at 2 scales; a narrower head than the default's 64 channels keeps tests fast."""
    return ModelSpec(
        **(
            {
                "emotion_model": "transfer",
                "emotion_trunk_blocks": 7,
                "emotion_input_size": 48,
                "emotion_pool": 3,
                "emotion_head_width": head_width,
                "emotion_scatter": 2,
            }
            | overrides
        )
    )
