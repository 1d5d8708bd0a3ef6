"""AppyPie adapter (being written: see issue 3)."""

from __future__ import annotations

from .base import ModelInfo, Provider


class AppyPie(Provider):
    id = "appypie"
    label = "AppyPie"
    key_env = "APPYPIE_SUBSCRIPTION_KEY"
    base_url_env = "APPYPIE_BASE_URL"
    default_base_url = "https://gateway.appypie.com"
    models = (ModelInfo("flux-1-schnell", frozenset({"generate"}), "FLUX"),)
    default_model = "flux-1-schnell"
