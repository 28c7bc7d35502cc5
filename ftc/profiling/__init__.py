"""Profiles: per-node costs written into the IR (Node.cost)."""

from .analytic import DeviceModel, profile_analytic
from .cache import ProfileCache, default_cache_dir
from .measure import profile_measured
from .measurement import DEVICES, MeasureSettings

# analytic: FLOPs and a roofline on the meta device; measure: times on real tensors.
PROFILES = ("analytic", "measure")

__all__ = [
    "DEVICES",
    "PROFILES",
    "DeviceModel",
    "MeasureSettings",
    "ProfileCache",
    "default_cache_dir",
    "profile_analytic",
    "profile_measured",
]
