"""A compact store's fitted parameters: written at creation, read back (and checked against the schema's sha256)
by every reader and writer of the store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from storage import layout
from storage.encoding import Encoding, EncodingError
from storage.schema import StoreSchema


def write(store: Any, schema: StoreSchema, encoding: Encoding) -> None:
    """Create the encoding/ arrays (never over a different layout) and write the parameters. Idempotent: equal
    parameters are equal bytes, which is what concurrent creators of one store rely on."""
    arrays = encoding.arrays()
    for spec in layout.encoding_arrays(schema):
        layout.create_or_open(store, spec)[...] = arrays[spec.name]


def read(array: Callable[[str], Any], schema: StoreSchema) -> Encoding:
    """The parameters of a compact store through `array(name)` (a checked zarr array). Raises EncodingError when
    they are not the ones the schema's fit recorded (sha256), or do not decode."""
    section = schema.encoding or {}
    fit = section.get("fit") or {}
    values = {spec.name: np.asarray(array(spec.name)[...]) for spec in layout.encoding_arrays(schema)}
    encoding = Encoding.from_arrays(values, width=schema.width, num_layers=len(schema.layers),
                                    components=layout.projected_components(schema))
    if encoding.digest() != fit.get("sha256"):
        raise EncodingError("its encoding parameters (encoding/*) are not those its schema's fit recorded (sha256)")
    return encoding
