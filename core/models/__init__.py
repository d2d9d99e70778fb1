"""Networks, their registry metadata, tap hooks and checkpoints. Importing this package registers every model."""

from __future__ import annotations

from core.models import basic_unet, dynunet, hdenseformer, swin_unetr, unetr, uxnet  # noqa: F401  (registration)
from core.models.registry import ModelSpec, TapSpec, create_model, get_spec, list_models, register_model
from core.models.taps import TapRecorder, attention_map

__all__ = [
    "ModelSpec",
    "TapRecorder",
    "TapSpec",
    "attention_map",
    "create_model",
    "get_spec",
    "list_models",
    "register_model",
]
