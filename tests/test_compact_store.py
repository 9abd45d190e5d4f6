"""Compact stores (format 3): int8 with two scales and PCA codes, written, read, reconstructed, resumed, damaged.

Real zarr stores in tmp_path with the tiny shapes of storage.testing (L=2, T=4, N+1=17, C=64); the quantisation
under outliers at ViT-B/16 width (C=768) on generated tokens. No mocks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import FeatureStore, StoreDamagedError, StoreMismatchError, dequantize_int8, quantize_int8
from storage.encoding import CODES, COMPONENTS, Encoding
from storage.pca import ErrorStats, FitAccumulator, fit
from storage.quantize import dequantize_scaled, quantize_scaled
from storage.root import ROOT_KEY, group_json
from storage.schema import ATTR_KEY
from storage.testing import fit_function, make_schema, manifest, open_writer, video_data, write_videos
from storage.writer import StoreWriter

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"int8": dict(dtype="int8", compact=True), "pca-fp16": dict(pca=64), "pca-int8": dict(pca=24, dtype="int8"),
         "pca-fraction-int8": dict(pca=0.6, dtype="int8")}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.fixture(scope="module", params=list(KINDS))
def compact(request, tmp_path_factory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp(request.param) / "s.zarr")
    write_videos(path, make_schema(num_videos=8, views=2, **KINDS[request.param]), range(8), finalize=True)
    return request.param, path


def test_a_compact_store_reads_like_an_fp16_store(compact):
    kind, path = compact
    store = FeatureStore.open(path)
    schema = store.schema
    assert schema.format_version == 3 and store.complete
    x = video_data(schema, 3)[2][1]
    got = store.features(7)
    assert got.shape == x.shape and got.dtype == np.float16
    # Full rank (K = C) is exact up to fp16; int8 alone within 1 %; fewer components lose what they leave out.
    bound = {"int8": 0.01, "pca-fp16": 0.002}.get(kind)
    if bound is not None:
        assert _relative(store.features(7, dtype=np.float32), x) < bound
    # A layer subset is the same bytes as the whole sample's layer.
    np.testing.assert_array_equal(store.features(7, layers=[1])[0], got[1])
    np.testing.assert_array_equal(store.features(7, layers=[1, 0]), got[[1, 0]])


def test_the_reader_returns_codes_as_stored_and_the_store_says_what_was_done(compact):
    kind, path = compact
    store = FeatureStore.open(path)
    enc, section = store.encoding, store.schema.encoding
    raw = store.read_sample(5)
    if enc.projected:
        assert raw.features.shape == (4 * 17 * sum(enc.components),)
        assert section["fit"]["components"] == list(enc.components)
        assert section["fit"]["grain"] == enc.grain and len(section["fit"]["variance_kept"]) == 2
        assert zarr.open_group(path, mode="r")[CODES].shape == (16, raw.features.size)
    else:
        assert raw.features.shape == (2, 4, 17, 64)
    assert raw.features.dtype == (np.int8 if enc.quantized else np.float16)
    assert (raw.scales is not None) == enc.quantized
    holdout = section["fit"]["holdout"]
    assert len(holdout["relative"]) == 2 and holdout["tokens"] > 0 and section["fit"]["holdout_videos"]
    if kind == "pca-fraction-int8":
        assert all(k % 8 == 0 for k in enc.components) and enc.grain >= 8


def test_the_numpy_recipe_in_storage_readme_reconstructs_what_features_returns(compact):
    """The recipe a stranger follows (zarr and numpy alone), executed as written in storage/README.md."""
    _kind, path = compact
    text = (ROOT / "storage" / "README.md").read_text()
    recipe = re.search(r"### Reconstructing tokens with zarr and numpy\n\n```python\n(.*?)```", text, re.S).group(1)
    for i in (0, 11):
        scope = {"STORE": path}
        exec(recipe.replace("enc, i = schema[\"encoding\"], 0", f"enc, i = schema[\"encoding\"], {i}"), scope)
        np.testing.assert_array_equal(scope["tokens"], FeatureStore.open(path).features(i))


def test_a_rerun_keeps_the_stored_fit_and_another_request_is_refused(tmp_path):
    path = str(tmp_path / "s.zarr")
    schema = make_schema(num_videos=6, views=1, pca=16, dtype="int8")
    write_videos(path, schema, [0, 1, 2])
    digest = FeatureStore.open(path).schema.encoding["fit"]["sha256"]

    def no_fit():
        raise AssertionError("a rerun must not fit again")

    w = open_writer(path, schema, fit=no_fit)
    assert w.pending() == [3, 4, 5] and w.encoding.digest() == digest
    w.write_video(3, *video_data(schema, 3))
    with pytest.raises(StoreMismatchError, match="encoding"):
        open_writer(path, make_schema(num_videos=6, views=1, pca=32, dtype="int8"))
    with pytest.raises(StoreMismatchError, match="dtype"):
        open_writer(path, make_schema(num_videos=6, views=1, pca=16))
    with pytest.raises(StoreMismatchError, match="encoding"):
        open_writer(path, make_schema(num_videos=6, views=1, dtype="int8", compact=True))  # int8 without PCA


def test_a_creation_left_by_another_fit_is_not_finished_with_this_one(tmp_path):
    """Root published (with its fit's sha256) but not created: only the same fit may create the arrays."""
    path = tmp_path / "s.zarr"
    schema = make_schema(num_videos=6, views=1, pca=16)
    record, encoding = fit_function(schema)()
    other = dict(record, sha256="0" * 64)
    path.mkdir()
    stored = schema.with_fit(other).with_manifest(*manifest(schema)[:2])
    (path / ROOT_KEY).write_bytes(group_json({ATTR_KEY: stored.to_json(), "created": False, "complete": False,
                                              "summary": None}))
    with pytest.raises(StoreMismatchError, match="another fit"):
        open_writer(str(path), schema)
    (path / ROOT_KEY).write_bytes(group_json({ATTR_KEY: schema.with_fit(record).with_manifest(
        *manifest(schema)[:2]).to_json(), "created": False, "complete": False, "summary": None}))
    w = open_writer(str(path), schema)  # the same fit (the same sample, on this CPU) finishes the creation
    w.write_video(0, *video_data(schema, 0))
    assert FeatureStore.open(str(path)).encoding.digest() == encoding.digest()


def test_damaged_parameters_are_refused_never_used(tmp_path):
    path = str(tmp_path / "s.zarr")
    write_videos(path, make_schema(num_videos=3, views=1, pca=16), range(3), finalize=True)
    arr = zarr.open_array(path, path=COMPONENTS, mode="r+")
    values = arr[...]
    values[0, 0] += 1.0
    arr[...] = values
    with pytest.raises(StoreDamagedError, match="sha256"):
        FeatureStore.open(path).features(0)


def test_encoded_features_from_a_device_are_written_as_given(tmp_path):
    path = str(tmp_path / "s.zarr")
    schema = make_schema(num_videos=2, views=2, pca=0.6, dtype="int8")
    w = open_writer(path, schema)
    facts, plans, x, clip = video_data(schema, 1)
    from storage.encoding import Encoded

    codes, scales = w.encoding.encode(x)
    w.write_video(1, facts, plans, Encoded(codes, scales), clip)
    np.testing.assert_array_equal(FeatureStore.open(path).read_sample(3).features, codes[1])
    with pytest.raises(ValueError, match="not this store's"):
        w.write_video(0, facts, plans, Encoded(codes[:, :-1], scales), clip)
    plain = open_writer(str(tmp_path / "plain.zarr"), make_schema(num_videos=2, views=2, dtype="int8"))
    with pytest.raises(ValueError, match="encoded features given, but store .* is not a compact store"):
        plain.write_video(0, facts, plans, Encoded(codes, scales), clip)


def test_old_stores_keep_their_format_and_bytes(tmp_path):
    """fp16 stays format 2 without an encoding; format-2 int8 stays per-token absmax."""
    for dtype in ("fp16", "int8"):
        path = str(tmp_path / f"{dtype}.zarr")
        schema = make_schema(num_videos=2, views=1, dtype=dtype)
        write_videos(path, schema, range(2), finalize=True)
        store = FeatureStore.open(path)
        assert store.schema.format_version == 2 and store.encoding is None
        assert "encoding" not in zarr.open_group(path, mode="r").attrs[ATTR_KEY]
        x = video_data(schema, 1)[2][0]
        expected = x.astype(np.float16) if dtype == "fp16" else dequantize_int8(*quantize_int8(x))
        np.testing.assert_array_equal(store.features(1), expected)
    assert isinstance(StoreWriter, type)


# ------------------------------------------------------------------ quantisation under outliers (ViT-B/16 width)

def _vit_tokens(seed: int, outlier_channels: list[int], tokens: int = 3152) -> np.ndarray:
    """(2 layers, tokens, 768) generated tokens: Gaussian with per-channel scales spread as in a residual stream
    (lognormal), a few channels x50-x100 on every token (systematic outlier features, LLM.int8()), and 2 % of tokens
    with massive activations (Sun et al. 2024: a few fixed channels at ~500-1000x the median magnitude; in ViTs
    the high-norm tokens of Darcet et al. 2024)."""
    model = np.random.default_rng(1234)  # the network: the same channel scales for the fit and the held-out tokens
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, tokens, 768)) * model.lognormal(0.0, 0.4, (2, 1, 768))
    x[:, :, outlier_channels] *= model.uniform(50, 100, len(outlier_channels))
    massive = rng.random(tokens) < 0.02
    x[:, massive, 100] = rng.uniform(500, 1000, massive.sum()) * np.sign(rng.standard_normal(massive.sum()))
    x[:, massive, 200] = rng.uniform(300, 600, massive.sum())
    return x.astype(np.float32)


def _errors(x: np.ndarray, xhat: np.ndarray, outliers: list[int]) -> tuple[float, float]:
    inliers = np.setdiff1d(np.arange(x.shape[-1]), outliers)
    return _relative(xhat, x), _relative(xhat[..., inliers], x[..., inliers])


@pytest.mark.parametrize("outliers", [[], [7, 300, 511, 700], [7, 13, 300, 420, 511, 700]])
def test_int8_with_channel_scales_stays_within_one_percent_under_outliers(outliers):
    """Per layer: <= 1 % relative Frobenius error overall AND over the channels that are not outliers (the error
    over a tensor with huge channels hides crushed small ones); per-token absmax (format 2) fails the latter."""
    acc = FitAccumulator(2, 768, FitAccumulator.stride_for(3152))
    acc.add(_vit_tokens(0, outliers))
    fitted = fit(acc, None, quantize=True)
    detected = fitted.outlier_channels
    assert all(set(outliers) | {100, 200} <= set(layer) for layer in detected)
    held = _vit_tokens(1, outliers)
    stats = ErrorStats(2, detected)
    for pos in range(2):
        codes, scales = fitted.encoding.encode_layer(pos, held[pos])
        xhat = dequantize_scaled(codes, scales, fitted.encoding.layer_scales(pos), fitted.encoding.layer_groups(pos))
        stats.add(pos, held[pos], xhat)
        overall, inlier = _errors(held[pos], xhat, outliers + [100, 200])
        assert overall <= 0.01 and inlier <= 0.01, (pos, overall, inlier)
        absmax_overall, absmax_inlier = _errors(held[pos], dequantize_int8(*quantize_int8(held[pos])).astype(
            np.float32), outliers + [100, 200])
        assert absmax_inlier > 0.05  # per-token absmax crushes the other channels of a massive token
    summary = stats.summary()
    assert max(summary["relative_inliers"]) <= 0.01 and min(summary["cosine_min"]) > 0.998


def test_quantize_scaled_codes_and_inverse():
    rng = np.random.default_rng(0)
    r = rng.uniform(0.1, 10, 32).astype(np.float32)
    x = (rng.standard_normal((5, 32)) * r).astype(np.float32)
    groups = np.zeros(32, np.uint8)
    groups[[3, 9]] = 1
    codes, scales = quantize_scaled(x, r, groups)
    assert codes.dtype == np.int8 and scales.shape == (5, 2) and scales.dtype == np.float16
    assert (np.abs(codes[:, [3, 9]]).max(1) == 127).all() and (np.abs(np.delete(codes, [3, 9], 1)).max(1) == 127).all()
    assert _relative(dequantize_scaled(codes, scales, r, groups), x) < 0.01
    enc = Encoding(32, 1, None, channel_scales=r, channel_groups=groups)
    np.testing.assert_array_equal(enc.encode_layer(0, x)[0], codes)


def test_copies_of_a_compact_store_keep_its_codes_packed_or_subset(tmp_path):
    """copy --pca into a packed store equals the unpacked copy; copying a compact store without --pca/--dtype keeps
    its codes byte for byte (a layer subset too), with its parameters restricted to those layers."""
    from pipelines.copy import copy_store

    src = str(tmp_path / "src.zarr")
    write_videos(src, make_schema(num_videos=7, views=2), range(7), finalize=True)
    copy_store(src, str(tmp_path / "u.zarr"), pca=0.6, dtype="int8", progress=False)
    copy_store(src, str(tmp_path / "p.zarr"), pca=0.6, dtype="int8", videos_per_shard=3, progress=False)
    copy_store(str(tmp_path / "u.zarr"), str(tmp_path / "l1.zarr"), layers="1", progress=False)
    unpacked, packed, layer1 = (FeatureStore.open(tmp_path / n) for n in ("u.zarr", "p.zarr", "l1.zarr"))
    assert packed.videos_per_shard == 3 and layer1.schema.encoding["fit"]["components"] == \
        unpacked.schema.encoding["fit"]["components"][1:]
    for i in range(14):
        np.testing.assert_array_equal(packed.read_sample(i).features, unpacked.read_sample(i).features)
        np.testing.assert_array_equal(layer1.read_sample(i).features, unpacked.read_sample(i, layers=[1]).features)
        np.testing.assert_array_equal(layer1.features(i), unpacked.features(i, layers=[1]))
    with pytest.raises(ValueError, match="compact store's codes"):
        unpacked.read_sample(0).dequantized()
