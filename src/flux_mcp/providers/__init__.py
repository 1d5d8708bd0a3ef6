"""The provider adapters. `PROVIDER_CLASSES` is in the order used to pick a default provider."""

from __future__ import annotations

from .atlascloud import AtlasCloud
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .placeholder import Placeholder

PROVIDER_CLASSES: tuple[type[Provider], ...] = (
    AtlasCloud,
    Placeholder,
)
"""Every provider, real ones first in the order FLUX_MCP_PROVIDER's default picks them; placeholder last."""

__all__ = [
    "PROVIDER_CLASSES", "AtlasCloud", "ImageRequest", "JobState", "ModelInfo", "OutputRef", "Placeholder",
    "Provider", "Range", "Submitted",
]
