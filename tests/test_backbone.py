"""The frozen CLIP: loading, fingerprinting, layer selection, and rebuilding a store's backbone safely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_cache.backbone import BUNDLED_CONFIGS, load_backbone, load_recorded_backbone
from dist_cache.backbone_config import resolve_layers
from dist_cache.errors import UserError


def test_layers_spec():
    assert resolve_layers("all", 12) == list(range(12))
    assert resolve_layers("last:3", 12) == [9, 10, 11]
    assert resolve_layers("11, 3,7", 12) == [3, 7, 11]
    for bad in ("last:0", "last:13", "12", "-1", "x", ""):
        with pytest.raises(UserError):
            resolve_layers(bad, 12)


def test_weights_hash_identifies_the_weights(tiny_checkpoint):
    a = load_backbone("dist-tiny", str(tiny_checkpoint))
    b = load_backbone("dist-tiny", str(tiny_checkpoint))
    assert a.weights_sha256 == b.weights_sha256
    torch.manual_seed(99)
    c = load_backbone("dist-tiny", "none", allow_random_weights=True)
    assert c.weights_sha256 != a.weights_sha256


def test_encoder_returns_every_selected_block_with_cls_first(tiny_checkpoint):
    backbone = load_backbone("dist-tiny", str(tiny_checkpoint))
    images = torch.randn(3, 3, 64, 64)
    tokens, embeds = backbone.spatial_encoder([1])(images)
    assert tokens.shape == (1, 3, 17, 64) and embeds.shape == (3, 64)
    outputs = []
    hook = backbone.model.visual.transformer.resblocks[1].register_forward_hook(lambda m, i, o: outputs.append(o))
    expected_embeds = backbone.model.visual(images)
    hook.remove()
    assert torch.equal(tokens[0], outputs[0]) and torch.allclose(embeds, expected_embeds)


def test_a_store_config_model_is_rebuilt_and_checked(tmp_path, tiny_checkpoint):
    config = tmp_path / "my-vit.json"
    config.write_text((BUNDLED_CONFIGS / "dist-tiny.json").read_text())
    recorded = load_backbone(str(config), str(tiny_checkpoint)).describe()
    import open_clip

    open_clip.factory._MODEL_CONFIGS.pop("my-vit", None)  # as on a machine that never saw the JSON
    assert load_recorded_backbone(recorded, str(tiny_checkpoint)).weights_sha256 == recorded["weights_sha256"]


def test_a_store_cannot_write_files_through_its_model_name(tmp_path, tiny_checkpoint):
    recorded = load_backbone("dist-tiny", str(tiny_checkpoint)).describe()
    target = tmp_path / "pwned"
    recorded["model"] = str(Path("..") / ".." / ".." / target)
    with pytest.raises(UserError, match="not a valid model name"):
        load_recorded_backbone(recorded, pretrained=str(tiny_checkpoint))
    assert not target.with_suffix(".json").exists()


def test_a_store_never_chooses_which_local_file_is_opened(tiny_checkpoint):
    """A recorded local path is a stranger's choice: even a loadable checkpoint there is not opened until the user
    passes it; a recorded tag (looked up in the hub cache) needs no such consent."""
    recorded = load_backbone("dist-tiny", str(tiny_checkpoint)).describe()
    assert recorded["pretrained_source"] == str(tiny_checkpoint)
    with pytest.raises(UserError, match="cannot choose to open: pass --pretrained PATH") as info:
        load_recorded_backbone(recorded)
    assert "\n" not in str(info.value) and str(tiny_checkpoint) in str(info.value)
    for hostile in ("/etc/passwd", "../../../etc/shadow"):
        with pytest.raises(UserError, match="cannot choose to open"):
            load_recorded_backbone(dict(recorded, pretrained_source=hostile))
    assert load_recorded_backbone(recorded, str(tiny_checkpoint)).weights_sha256 == recorded["weights_sha256"]


def test_other_weights_are_refused_by_hash(tiny_checkpoint, tmp_path):
    recorded = load_backbone("dist-tiny", str(tiny_checkpoint)).describe()
    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    torch.save(load_backbone("dist-tiny", "none", allow_random_weights=True).model.state_dict(), other)
    with pytest.raises(UserError, match="differs from the store"):
        load_recorded_backbone(recorded, pretrained=str(other))
    with pytest.raises(UserError, match="no such checkpoint"):
        load_recorded_backbone(recorded, pretrained=str(tmp_path / "absent.pt"))
    recorded_random = dict(recorded, pretrained="none", pretrained_source="none")
    with pytest.raises(UserError, match="random weights"):
        load_recorded_backbone(recorded_random)
    json.dumps(recorded)  # the record is plain JSON
