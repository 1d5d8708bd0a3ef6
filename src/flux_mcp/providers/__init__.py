"""The provider adapters. `PROVIDER_CLASSES` is in the order used to pick a default provider."""

from __future__ import annotations

from .acedatacloud import AceDataCloud
from .appypie import AppyPie
from .atlascloud import AtlasCloud
from .base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from .imagepipeline import ImagePipeline
from .placeholder import Placeholder
from .segmind import Segmind

PROVIDER_CLASSES: tuple[type[Provider], ...] = (
    AtlasCloud,
    Segmind,
    AceDataCloud,
    ImagePipeline,
    AppyPie,
    Placeholder,
)
"""Every provider, real ones first in the order FLUX_MCP_PROVIDER's default picks them; placeholder last."""

__all__ = [
    "PROVIDER_CLASSES", "AceDataCloud", "AppyPie", "AtlasCloud", "ImagePipeline", "Segmind", "ImageRequest", "JobState", "ModelInfo", "OutputRef", "Placeholder",
    "Provider", "Range", "Submitted",
]
