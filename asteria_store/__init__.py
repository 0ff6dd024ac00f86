"""asteria-store: a persistent, disk-backed vector store with a learned routing index.

    import asteria_store
    store = asteria_store.create("mystore", dim=384)
    store.ingest("db.npy")
    ids, scores = store.query(vec, k=10)
    ids, scores = store.search(queries, k=10)
"""

from .config import FORMAT_VERSION, StoreConfig
from .errors import (
    AsteriaError,
    BatchJobError,
    CorruptStoreError,
    DimensionMismatchError,
    DiskFullError,
    DuplicateIdError,
    IdNotFoundError,
    InvalidArgumentError,
    InvalidInputError,
    ModelFileError,
    ReadOnlyError,
    StoreChangedError,
    StoreClosedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    StorageError,
    UnsupportedFormatError,
)
from .model.fit import train_model
from .batch import Collection, create_collection, open_collection
from .store import CompactResult, DeleteResult, IngestResult, Store, TrainResult, VerifyReport, create, open

__version__ = "0.1.0"

__all__ = [
    "Collection",
    "CompactResult",
    "FORMAT_VERSION",
    "AsteriaError",
    "BatchJobError",
    "CorruptStoreError",
    "DeleteResult",
    "DimensionMismatchError",
    "DiskFullError",
    "DuplicateIdError",
    "IdNotFoundError",
    "IngestResult",
    "InvalidArgumentError",
    "InvalidInputError",
    "ModelFileError",
    "ReadOnlyError",
    "Store",
    "StoreChangedError",
    "StoreClosedError",
    "StoreConfig",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StorageError",
    "TrainResult",
    "UnsupportedFormatError",
    "VerifyReport",
    "create",
    "create_collection",
    "open",
    "open_collection",
    "train_model",
]
