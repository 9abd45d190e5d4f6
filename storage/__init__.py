"""The feature store: a versioned zarr v3 layout for cached CLIP token features (see storage/README.md).

    from storage import FeatureStore, StoreWriter
"""

from storage.errors import SampleNotDoneError, StoreMismatchError, StoreNotFoundError
from storage.quantize import dequantize_int8, quantize_int8
from storage.reader import FeatureStore
from storage.schema import FORMAT_VERSION, compat_of, validate_schema
from storage.writer import StoreWriter

__all__ = [
    "FORMAT_VERSION", "FeatureStore", "SampleNotDoneError", "StoreMismatchError", "StoreNotFoundError",
    "StoreWriter", "compat_of", "dequantize_int8", "quantize_int8", "validate_schema",
]
