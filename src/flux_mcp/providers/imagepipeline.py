"""ImagePipeline adapter (being written: see issue 3)."""

from __future__ import annotations

from .base import ModelInfo, Provider


class ImagePipeline(Provider):
    id = "imagepipeline"
    label = "ImagePipeline"
    key_env = "IMAGEPIPELINE_API_KEY"
    base_url_env = "IMAGEPIPELINE_BASE_URL"
    default_base_url = "https://api.imagepipeline.io"
    models = (ModelInfo("flux-schnell", frozenset({"generate"}), "FLUX"),)
    default_model = "flux-schnell"
