"""SuS support sets (Udandarao et al., ICCV 2023): labelled images for a task built from its
class names alone, by retrieval from an unlabelled pool or by text-to-image generation,
saved as an ordinary folder dataset (class folders + manifest.json with the class index).

    build_support(backbone, classnames, pool="world:pool") -> SupportSet
    default_pool("world:animals") -> "world:pool"
"""
from .build import FORMAT, SupportSet, SupportWarning, build_support, default_pool
from .index import PoolIndex, build_index, exact_topk
from .pools import POOLS, Pool, load_pool

__all__ = ["FORMAT", "SupportSet", "SupportWarning", "build_support", "default_pool",
           "PoolIndex", "build_index", "exact_topk", "POOLS", "Pool", "load_pool"]
