"""The feature store: a versioned zarr v3 layout for cached CLIP token features (see storage/README.md).

    from storage import FeatureStore, StoreWriter
"""

from storage.errors import (
                            SampleNotDoneError,
                            StoreDamagedError,
                            StoreMismatchError,
                            StoreNotFoundError,
                            StoreWriteError,
)
from storage.quantize import dequantize_int8, quantize_int8
from storage.reader import FeatureStore, RawSample
from storage.schema import FORMAT_VERSION, SampleStatus, StoreSchema
from storage.writer import StoreWriter

__all__ = [
    "FORMAT_VERSION", "FeatureStore", "RawSample", "SampleNotDoneError", "SampleStatus", "StoreDamagedError",
    "StoreMismatchError", "StoreNotFoundError", "StoreSchema", "StoreWriteError", "StoreWriter",
    "dequantize_int8", "quantize_int8",
]
