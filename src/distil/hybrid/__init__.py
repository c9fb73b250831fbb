"""Attention -> SSM hybrids: MIL initialisation, layer placement, progressive conversion."""

from distil.hybrid.mil import hybridize
from distil.hybrid.placement import LayerSelection, select_layers

__all__ = ["hybridize", "select_layers", "LayerSelection"]
