"""Segmind adapter (being written: see issue 3)."""

from __future__ import annotations

from .base import ModelInfo, Provider


class Segmind(Provider):
    id = "segmind"
    label = "Segmind"
    key_env = "SEGMIND_API_KEY"
    base_url_env = "SEGMIND_BASE_URL"
    default_base_url = "https://api.segmind.com"
    models = (ModelInfo("flux-schnell", frozenset({"generate"}), "FLUX"),)
    default_model = "flux-schnell"
