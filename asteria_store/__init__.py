"""asteria-store: a persistent, disk-backed vector store with a learned routing index.

    import asteria_store
    store = asteria_store.create("mystore", dim=384)
    store.ingest("db.npy")
    ids, scores = store.query(vec, k=10)
    ids, scores = store.search(queries, k=10)
"""

from .batch import Collection, create_collection, open_collection
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
    StorageError,
    StoreChangedError,
    StoreClosedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedFormatError,
    UpkeepDeferredWarning,
)
from .model.fit import train_model
from .store import (
    CompactResult,
    DeleteResult,
    IngestResult,
    Store,
    TrainResult,
    VerifyReport,
    create,
    open,
)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "AsteriaError",
    "BatchJobError",
    "Collection",
    "CompactResult",
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
    "StorageError",
    "Store",
    "StoreChangedError",
    "StoreClosedError",
    "StoreConfig",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "TrainResult",
    "UnsupportedFormatError",
    "UpkeepDeferredWarning",
    "VerifyReport",
    "create",
    "create_collection",
    "open",
    "open_collection",
    "train_model",
]
