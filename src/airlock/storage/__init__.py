"""Storage behind one interface: the input cache, the quarantine and trusted storage."""

from airlock.storage.base import Storage, StorageError
from airlock.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "StorageError"]
