"""Declarative architecture mappings: schema, loading and lookup."""

from .registry import MappingRegistry, default_registry, mappings_dir
from .schema import ArchMapping, TensorRule

__all__ = ["ArchMapping", "TensorRule", "MappingRegistry", "default_registry", "mappings_dir"]
