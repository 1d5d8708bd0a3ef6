"""AceDataCloud adapter (being written: see issue 3)."""

from __future__ import annotations

from .base import ModelInfo, Provider


class AceDataCloud(Provider):
    id = "acedatacloud"
    label = "AceDataCloud"
    key_env = "ACEDATACLOUD_API_TOKEN"
    base_url_env = "ACEDATACLOUD_BASE_URL"
    default_base_url = "https://api.acedata.cloud"
    models = (ModelInfo("flux-dev", frozenset({"generate"}), "FLUX"),)
    default_model = "flux-dev"
