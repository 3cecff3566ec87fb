"""Placeholder until the custom BatchNorm lands (helper overwrites this file)."""
from torch.nn import BatchNorm1d, BatchNorm2d  # noqa: F401
