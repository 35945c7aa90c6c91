"""hub layer: Model Label Learning (METHODS.md §5).

graph.py (SDAG over WordNet), mapping.py (class name → synset), store.py (SQLite hub:
models, heads, graph, label shards and matrices), label.py (model labelling, in-process or on
Ray); selection and reuse build on `HubStore.labels()`.
"""
from .graph import GraphError, Node, SemanticGraph, build_graph, canonical_synset
from .mapping import Mapping, MappingError, load_overrides, map_classnames
from .store import HubError, HubLabels, HubSchemaError, HubStore, SCHEMA_VERSION

__all__ = ["GraphError", "Node", "SemanticGraph", "build_graph", "canonical_synset", "Mapping",
           "MappingError", "load_overrides", "map_classnames", "HubError", "HubLabels",
           "HubSchemaError", "HubStore", "SCHEMA_VERSION"]
