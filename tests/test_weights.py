"""CLIP weights: the activation they were trained with, the hub cache without a network, and files from strangers.

Real components only: open_clip models, safetensors and TorchScript archives written here, a hub cache laid out
as huggingface_hub lays it out, and the CLI run as a subprocess with the environment a user would set.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from dist_cache.backbone import activation_mismatch, load_backbone, load_recorded_backbone, recorded_activation
from dist_cache.decoders import get_decoder
from dist_cache.errors import UserError
from dist_cache.logs import without_log_message
from dist_cache.sampling import ViewPlan
from dist_cache.transforms import normalize_frames, render_frames
from dist_cache.weights import NOT_CACHED, tag_weights_file
from storage import FeatureStore

REPO = Path(__file__).resolve().parents[1]


def dist_cache(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **env})


def extract_args(motion_dataset: Path, out: Path, *extra: str) -> list:
    return ["extract", "--manifest", motion_dataset / "val.csv", "--video-root", motion_dataset / "videos",
            "--out", out, "--frames", "2", "--split", "test", "--decode-workers", "1", "--device", "cpu", *extra]


def last_layer(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model.visual.forward_intermediates(images, indices=[len(model.visual.transformer.resblocks) - 1],
                                                 output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1).numpy()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- QuickGELU ---------------------------------------------------------------------------------------------

def test_the_openai_tag_runs_quickgelu_from_the_hub_cache_offline(tmp_path, motion_dataset, openai_hub_cache):
    out = tmp_path / "b32.zarr"
    # The plain config name, as users type it: open_clip's ViT-B-32 config says GELU, the openai tag QuickGELU.
    run = dist_cache(*extract_args(motion_dataset, out, "--model", "ViT-B-32", "--pretrained", "openai",
                                   "--layers", "last:1"),
                     env={"HF_HOME": str(openai_hub_cache), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    store = FeatureStore.open(str(out))
    assert store.schema.backbone["activation"] == "quick_gelu" and store.schema.backbone["pretrained"] == "openai"

    weights = next(openai_hub_cache.rglob("open_clip_model.safetensors"))
    sample = store.sample(0)
    plan = ViewPlan.from_dict(sample)
    frames = get_decoder("decord").read(motion_dataset / "videos" / sample["video"], plan.sparse_indices)
    backbone = store.schema.backbone
    images = normalize_frames(render_frames(frames, plan, 224), backbone["mean"], backbone["std"])
    stored = store.features(0)[0].astype(np.float32)  # (T, N+1, C), the last layer
    # Independent forwards: open_clip's own loader, each activation.
    quick = last_layer(open_clip.create_model("ViT-B-32-quickgelu", pretrained=str(weights)).eval(), images)
    gelu = last_layer(open_clip.create_model("ViT-B-32", pretrained=str(weights)).eval(), images)
    assert relative(stored, quick) < 1e-3  # fp16 storage
    assert relative(stored, gelu) > 10 * relative(stored, quick)
    assert relative(gelu, quick) > 3e-3  # the two activations really give other features


def test_the_recorded_activation_is_rebuilt(tiny_checkpoint):
    images = torch.randn(2, 3, 64, 64)
    gelu = load_backbone("dist-tiny", str(tiny_checkpoint))
    quick = load_backbone("dist-tiny", str(tiny_checkpoint), activation="quick_gelu")
    assert (gelu.activation, quick.activation) == ("gelu", "quick_gelu")
    assert gelu.weights_sha256 == quick.weights_sha256  # same weights, other network
    assert not torch.allclose(gelu.spatial_encoder([1])(images)[0], quick.spatial_encoder([1])(images)[0])
    rebuilt = load_recorded_backbone(quick.describe(), pretrained=str(tiny_checkpoint))
    assert rebuilt.activation == "quick_gelu"
    torch.testing.assert_close(rebuilt.spatial_encoder([1])(images)[0], quick.spatial_encoder([1])(images)[0])
    # A dist-cache 0.1 record (store format 1) has no activation: it is rebuilt as it was built then.
    old = {k: v for k, v in quick.describe().items() if k != "activation"}
    assert recorded_activation(old) == "gelu" and load_recorded_backbone(old, str(tiny_checkpoint)).activation == "gelu"


def test_an_openai_record_built_with_gelu_is_flagged():
    record = {"model": "ViT-B-16", "pretrained": "openai", "model_config": open_clip.get_model_config("ViT-B-16")}
    assert "QuickGELU" in activation_mismatch(record)  # a format-1 store: no activation recorded, GELU built
    assert activation_mismatch({**record, "activation": "quick_gelu"}) is None
    assert activation_mismatch({**record, "pretrained": "laion2b_s34b_b88k"}) is None  # trained with GELU
    quick_config = open_clip.get_model_config("ViT-B-16-quickgelu")
    assert activation_mismatch({**record, "model": "ViT-B-16-quickgelu", "model_config": quick_config}) is None


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_torchscript_archive_loads_without_running_it_and_says_quickgelu(tmp_path):
    torch.manual_seed(3)
    clip = open_clip.create_model("dist-tiny", force_quick_gelu=True).eval()
    archive = tmp_path / "ViT-tiny.pt"  # OpenAI ships its CLIPs as TorchScript archives like this one
    torch.jit.script(clip).save(str(archive))
    plain = tmp_path / "state.pt"
    torch.save(clip.state_dict(), plain)

    scripted = load_backbone("dist-tiny", str(archive))
    assert scripted.activation == "quick_gelu"  # from the archive's own modules: the config says GELU
    assert scripted.weights_sha256 == load_backbone("dist-tiny", str(plain), activation="quick_gelu").weights_sha256
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted.model.encode_image(images), clip.encode_image(images))


class _Marker:
    """Unpickling this creates a file: what a hostile pickle would do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.proj": torch.ones(1)}, "hook": _Marker(marker)}, evil)
    with pytest.raises(UserError, match="pickled Python objects") as info:
        load_backbone("dist-tiny", str(evil))
    assert "\n" not in str(info.value) and not marker.exists()

    # The same hidden in a TorchScript archive's data.pkl.
    script = tmp_path / "evil-script.pt"
    with zipfile.ZipFile(script, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_Marker(marker), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(UserError, match="the TorchScript archive refers to") as info:
        load_backbone("dist-tiny", str(script))
    assert "\n" not in str(info.value) and not marker.exists()


# ---- the hub cache and no network --------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable"])
def test_missing_weights_without_a_network_fail_at_once_in_one_line(tmp_path, motion_dataset, network):
    # The defaults, --model ViT-B-16 --pretrained openai, on a machine whose cache lacks the weights.
    env = {"HF_HOME": str(tmp_path / "empty-hf-home")}
    env.update({"HF_HUB_OFFLINE": "1"} if network == "HF_HUB_OFFLINE" else
               {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    run = dist_cache(*extract_args(motion_dataset, tmp_path / "s.zarr"), env=env)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {NOT_CACHED}") and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "s.zarr").exists()


def test_a_cached_tag_is_used_without_asking_the_network(openai_hub_cache, monkeypatch):
    from huggingface_hub import constants

    import dist_cache.weights as weights

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(openai_hub_cache / "hub"))
    monkeypatch.setattr(weights, "_unreachable", lambda url: pytest.fail("the network was probed"))
    path = tag_weights_file(open_clip.get_pretrained_cfg("ViT-B-32", "openai"))
    assert path.endswith("open_clip_model.safetensors") and Path(path).is_file()


# ---- records from strangers ----------------------------------------------------------------------------------

def test_a_recorded_giant_architecture_is_refused_before_it_is_built(tiny_checkpoint):
    record = load_backbone("dist-tiny", str(tiny_checkpoint)).describe()
    config = json.loads(json.dumps(record["model_config"]))
    config["vision_cfg"].update(width=8192, layers=128)  # each field within its bound, together 103 B parameters
    giant = {**record, "model": "giant-vit", "model_config": config}
    with pytest.raises(UserError, match="103.1 B parameters") as info:
        load_recorded_backbone(giant, pretrained=str(tiny_checkpoint))
    assert "\n" not in str(info.value) and "the store" in str(info.value)
    nonsense = {**record, "model": "broken-vit", "model_config": {"embed_dim": "x"}}
    with pytest.raises(UserError, match="no such model config"):
        load_recorded_backbone(nonsense, pretrained=str(tiny_checkpoint))
    nonsense["model_config"] = {**record["model_config"], "embed_dim": "x"}
    with pytest.raises(UserError, match="embed_dim is 'x': must be an integer"):
        load_recorded_backbone(nonsense, pretrained=str(tiny_checkpoint))


HUGE_CONFIG = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 100000, "width": 16384, "patch_size": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}


def test_a_huge_model_config_is_refused_before_open_clip_builds_anything(val_store, motion_dataset,
                                                                         tiny_checkpoint, tmp_path, monkeypatch):
    """A recorded config of 100000 blocks of width 16384 under an unknown name (verify --video-root and train
    --online rebuild it), and the same config as extract --model CONFIG.json: refused in one line from the
    config alone; open_clip.create_model is never reached (building it took minutes and gigabytes)."""
    from click.testing import CliRunner

    import cli

    built: list[str] = []

    def create_model(name: str, *args, **kwargs):  # nothing here may build a network at all: never reached
        built.append(name)
        raise RuntimeError("open_clip.create_model was reached")

    monkeypatch.setattr(open_clip, "create_model", create_model)
    store = tmp_path / "s.zarr"
    shutil.copytree(val_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["dist_cache"]["backbone"].update(model="huge-vit", model_config=HUGE_CONFIG)
    (store / "zarr.json").write_text(json.dumps(meta))
    runner = CliRunner()
    said = "vision_cfg.layers is 100000: must be an integer in 1..256"

    verified = runner.invoke(cli.main, ["verify", str(store), "--video-root", str(motion_dataset / "videos"),
                                        "--samples", "1", "--pretrained", str(tiny_checkpoint)])
    # verify stops on it (whether it reports it as a problem of the store or as a usage error), saying why
    assert verified.exit_code in (1, 2), verified.output
    said_lines = [line for line in verified.output.splitlines() if "the store's backbone: model huge-vit" in line]
    assert len(said_lines) == 1 and said in said_lines[0], verified.output

    trained = runner.invoke(cli.main, ["train", "--cache", str(store), "--video-root", str(motion_dataset / "videos"),
                                       "--out", str(tmp_path / "run"), "--online", "--pretrained",
                                       str(tiny_checkpoint), "--device", "cpu", "--decode-workers", "0"])
    assert trained.exit_code == 2 and trained.output.strip().splitlines()[-1].startswith("error: ") and \
        said in trained.output.strip().splitlines()[-1], trained.output
    assert not (tmp_path / "run").exists()

    config = tmp_path / "huge-vit.json"
    config.write_text(json.dumps(HUGE_CONFIG))
    extracted = runner.invoke(cli.main, [str(a) for a in extract_args(motion_dataset, tmp_path / "e.zarr", "--model",
                                                                      config, "--pretrained", "none",
                                                                      "--allow-random-weights")])
    assert extracted.exit_code == 2 and f"error: --model huge-vit: {said}" in extracted.output, extracted.output
    assert not (tmp_path / "e.zarr").exists()
    assert built == []


def test_a_non_vit_model_is_refused_in_one_line():
    with pytest.raises(UserError, match="ViT visual tower"):
        load_backbone("RN50", "none", allow_random_weights=True)


# ---- precision ---------------------------------------------------------------------------------------------------

def test_precision_on_the_cpu(tiny_checkpoint):
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        load_backbone("dist-tiny", str(tiny_checkpoint), precision="fp16")
    fp32 = load_backbone("dist-tiny", str(tiny_checkpoint))
    bf16 = load_backbone("dist-tiny", str(tiny_checkpoint), precision="bf16")
    images = torch.randn(3, 3, 64, 64)
    exact, _ = fp32.spatial_encoder([0, 1])(images)
    mixed, embeddings = bf16.spatial_encoder([0, 1])(images)
    assert exact.dtype == torch.float32 and mixed.dtype == embeddings.dtype == torch.bfloat16
    assert relative(mixed.float().numpy(), exact.numpy()) < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # exactly CPU autocast, nothing else
        expected, _ = fp32.spatial_encoder([0, 1])(images)
    torch.testing.assert_close(mixed, expected.to(torch.bfloat16))


# ---- logs ----------------------------------------------------------------------------------------------------------

def test_only_the_expected_log_message_is_quietened(caplog):
    root = logging.getLogger()
    filters = list(root.filters)
    with caplog.at_level(logging.WARNING), without_log_message("No pretrained weights loaded"):
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        logging.warning("QuickGELU mismatch between final model config and pretrained tag")
    assert [r.getMessage() for r in caplog.records] == ["QuickGELU mismatch between final model config "
                                                        "and pretrained tag"]
    assert root.filters == filters
