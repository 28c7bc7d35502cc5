"""Profiles: per-node costs written into the IR (Node.cost)."""

from .analytic import DeviceModel, profile_analytic

__all__ = ["DeviceModel", "profile_analytic"]
