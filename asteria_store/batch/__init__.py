"""Offline batch jobs on Dask and sharded collections.

- :func:`search`: millions of queries against a store or collection, in query blocks on a
  ``dask.distributed`` cluster (local by default), results in a Zarr group, resumable;
- :class:`Collection`: one logical collection over several stores (shards) sharing one
  routing model; :func:`create_collection`, :func:`open_collection`.

Dask is imported only when a job runs on it.
"""

from .collection import (
    Collection,
    CollectionIngestResult,
    create_collection,
    is_collection,
    open_collection,
)
from .job import DEFAULT_BLOCK_ROWS, BatchResult, search
from .topk import merge_topk

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "BatchResult",
    "Collection",
    "CollectionIngestResult",
    "create_collection",
    "is_collection",
    "merge_topk",
    "open_collection",
    "search",
]
