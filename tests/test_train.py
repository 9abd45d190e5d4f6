"""Stage-two building blocks without a store: the resumable sampler, the schedule, the optimiser groups,
checkpoint files."""

from __future__ import annotations

import datetime
import math
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from dist_cache.errors import UserError
from dist_cache.model import DiST, DiSTConfig, DiSTSwitches
from pipelines.train.checkpoint import load_checkpoint, save_checkpoint
from pipelines.train.data.loader import EpochSampler
from pipelines.train.optim import lr_at, param_groups, restore_scaler
from pipelines.train.plots import read_metrics

# 7 videos x 3 views; video 2 failed at extraction (no usable view), video 5 has only views 0 and 2.
USABLE = np.array([i for i in range(21) if i // 3 != 2 and i != 16])


def _epoch(sampler: EpochSampler, epoch: int, skip: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, skip)
    return list(sampler)


def test_train_sampler_draws_one_usable_view_per_video_seeded_by_epoch():
    sampler = EpochSampler(USABLE, 3, batch_size=4, seed=7)
    first = [i for batch in _epoch(sampler, 0) for i in batch]
    assert sorted(i // 3 for i in first) == [0, 1, 3, 4, 5, 6]
    assert set(first) <= set(USABLE.tolist())
    assert first == [i for batch in _epoch(EpochSampler(USABLE, 3, batch_size=4, seed=7), 0) for i in batch]
    orders = {tuple(i for batch in _epoch(sampler, e) for i in batch) for e in range(6)}
    assert len(orders) > 1, "the order and the views must change from epoch to epoch"
    assert [len(b) for b in _epoch(sampler, 0)] == [4, 2] and sampler.batches_per_epoch == 2


def test_train_sampler_resume_skips_exactly_the_consumed_batches():
    sampler = EpochSampler(USABLE, 3, batch_size=2, seed=1)
    full = _epoch(sampler, 3)
    for skip in range(len(full) + 1):
        assert _epoch(sampler, 3, skip) == full[skip:]
        assert len(sampler) == len(full) - skip


def test_train_sampler_splits_an_epoch_across_ranks():
    world = 4
    ranks = [EpochSampler(USABLE, 3, batch_size=1, seed=2, rank=r, world_size=world) for r in range(world)]
    parts = [[i for batch in _epoch(s, 5) for i in batch] for s in ranks]
    assert len({len(p) for p in parts}) == 1, "every rank must run the same number of steps"
    order = ranks[0].epoch_order(5).tolist()
    assert sorted(set(i for p in parts for i in p)) == sorted(order)
    assert [parts[r][j] for j in range(len(parts[0])) for r in range(world)][: len(order)] == order


def test_eval_sampler_visits_every_usable_sample_in_order():
    sampler = EpochSampler(USABLE, 3, batch_size=5, train=False)
    assert [i for batch in _epoch(sampler, 0) for i in batch] == USABLE.tolist()
    assert _epoch(sampler, 4) == _epoch(sampler, 0)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    kw = dict(peak=3.2e-4, total=100, warmup=10, start=8e-7)
    assert lr_at(0, **kw) == pytest.approx(8e-7)
    cosine_at_warmup = 3.2e-4 * 0.5 * (1 + math.cos(math.pi * 10 / 100))
    assert lr_at(5, **kw) == pytest.approx((8e-7 + cosine_at_warmup) / 2)
    assert lr_at(10, **kw) == pytest.approx(cosine_at_warmup)
    assert lr_at(50, **kw) == pytest.approx(1.6e-4)
    assert lr_at(100, **kw) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_optimizer_groups_hold_every_parameter_and_decay_only_weight_matrices():
    config = DiSTConfig(width=64, patch_size=16, image_size=64, num_frames=4, embed_dim=64, layers=[0, 1],
                        switches=DiSTSwitches(alpha_dim=32, beta_dim=16))
    model = DiST(config)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept  # biases are optimised (release bug B1)
    assert all(n.endswith("bias") or "norm" in n or "token" in n or "query" in n or "pos" in n for n in kept)
    assert {"head.proj", "psi.0.down.weight", "integration.fcs.0.weight",
            "head.pool.blocks.0.spatial.attn.in_proj_weight", "temporal.stem.conv.weight"} <= decayed
    assert {"psi.0.cls_token", "head.pool.temporal_pos", "head.pool.video_query",
            "temporal.stem.conv.bias", "head.ln_post.weight"} <= kept


def tiny_payload() -> dict:
    """What train writes, for a small branch."""
    config = DiSTConfig(width=64, patch_size=16, image_size=64, num_frames=4, embed_dim=64, layers=[0, 1],
                        switches=DiSTSwitches(alpha_dim=32, beta_dim=16, t_block="tada"))
    return {"model": DiST(config).state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}, "step": 3, "epoch": 0,
            "steps_per_epoch": 8, "best_top1": None, "epoch_loss": [0.0, 0], "dist_config": config.to_dict(),
            "train_config": {}, "store": {"fingerprint": "f", "backbone": {}, "class_names": ["a", "b"]}}


def test_checkpoint_write_is_atomic_and_loads_without_pickled_code(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", tiny_payload())
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["step"] == 3
    torch.save({"format": "dist-cache-checkpoint", "version": 1, "obj": np.dtype("float32").type}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"not a dist-cache checkpoint \(it holds pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a dist-cache checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def _damaged(payload: dict, how: str) -> dict:
    if how == "missing key":
        del payload["optimizer"]
    elif how == "wrong type":
        payload["step"] = "3"
    elif how == "missing tensor":
        payload["model"].pop(sorted(payload["model"])[0])
    elif how == "extra tensor":
        payload["model"]["extra.weight"] = torch.zeros(2)
    elif how == "wrong shape":
        name = next(k for k in payload["model"] if k.endswith("fcs.0.weight"))
        payload["model"][name] = torch.zeros(5, 5)
    elif how == "huge alpha_dim":
        payload["dist_config"]["switches"]["alpha_dim"] = 10_000_000
    elif how == "unknown config key":
        payload["dist_config"]["switches"]["drop_path"] = 0.1
    elif how == "not a dict":
        payload["dist_config"] = [1, 2]
    return payload


@pytest.mark.parametrize("how", ["missing key", "wrong type", "missing tensor", "extra tensor", "wrong shape",
                                 "huge alpha_dim", "unknown config key", "not a dict"])
def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, how):
    path = save_checkpoint(tmp_path / "bad.pt", _damaged(tiny_payload(), how))
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_checkpoint_of_dist_cache_0_1_still_loads(tmp_path):
    payload = tiny_payload()
    config = payload["dist_config"]
    payload["dist_config"] = {k: v for k, v in config.items() if k != "switches"} | config["switches"]  # flat, as 0.1
    path = tmp_path / "old.pt"
    torch.save({"format": "dist-cache-checkpoint", "version": 1, **payload}, path)
    assert DiSTConfig.from_dict(load_checkpoint(path)["dist_config"]) == DiSTConfig.from_dict(config)


def test_train_resume_restores_the_scaler_only_from_a_scaled_run():
    # A checkpoint written on the CPU or with bf16 holds an empty scaler state; an fp16 resume starts fresh.
    enabled = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    restore_scaler(enabled, torch.amp.GradScaler("cpu", enabled=False).state_dict())
    assert enabled.get_scale() == 2.0**16
    saved = torch.amp.GradScaler("cpu", init_scale=8.0)
    restore_scaler(enabled, saved.state_dict())
    assert enabled.get_scale() == 8.0
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    restore_scaler(disabled, saved.state_dict())
    assert not disabled.is_enabled()


def test_train_metrics_log_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "step": 2, "lo')
    assert read_metrics(path) == [{"kind": "train", "step": 1, "loss": 2.0}]
    path.write_text('{"kind": "train", "st\n{"kind": "train", "step": 2, "loss": 2.0}\n')
    with pytest.raises(UserError, match="line 1"):
        read_metrics(path)
    assert read_metrics(tmp_path / "absent.jsonl") == []


def _step_model(amp):
    from pipelines.train.optim import make_optimizer, make_scaler
    from pipelines.train.step import StepModel

    config = DiSTConfig(width=64, patch_size=16, image_size=64, num_frames=4, embed_dim=32, layers=[0, 1],
                        switches=DiSTSwitches(alpha_dim=32, beta_dim=16, pool_blocks=1, temporal=False,
                                              integ_to_temp=False, temp_to_integ=False))
    torch.manual_seed(0)
    net = DiST(config)
    optimizer, scheduler = make_optimizer(net, lr=1e-3, weight_decay=1e-4, total=100, warmup=0, warmup_start_lr=1e-3)
    text = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    return StepModel(net, net, net, optimizer, scheduler, make_scaler(amp), text, (0.5,) * 3, (0.5,) * 3, amp, 0.1, 1.0)


def test_train_step_keeps_the_loss_in_fp32_and_learns_under_bf16_as_in_fp32():
    from pipelines.train.data.loader import Batch
    from pipelines.train.distributed import Ranks
    from pipelines.train.optim import loss_scaling
    from pipelines.train.step import train_step

    assert loss_scaling(torch.float16) and not loss_scaling(torch.bfloat16) and not loss_scaling(None)
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, 6, 4, 17, 64, generator=gen).half()
    batch = Batch(np.arange(6), np.arange(6), torch.arange(6) % 3, features, None)
    ranks = Ranks(0, 1, torch.device("cpu"))
    losses = {}
    for amp in (None, torch.bfloat16):  # CPU autocast stands in for the GPU's
        model = _step_model(amp)
        seen = []
        model.net.integration.fcs[0].register_forward_hook(lambda mod, inputs, out, seen=seen: seen.append(out.dtype))
        losses[amp] = [train_step(model, batch, ranks, None, s) for s in range(15)]
        assert all(isinstance(v, float) for v in losses[amp])
        if amp is not None:
            assert seen[0] == torch.bfloat16  # the branch ran under autocast; the logits and loss (floats) did not
    for amp, curve in losses.items():  # both learn the batch from the same start
        assert curve[0] == pytest.approx(losses[None][0], rel=0.05) and curve[-1] < 0.5 * curve[0], amp


def test_a_file_that_is_no_checkpoint_is_one_line_through_the_cli(tmp_path, motion_dataset):
    """Random bytes, a plain pickle (protocol 4, which torch warns about) and a pickle of objects, as eval's
    --checkpoint and as extract's --pretrained: one line each saying what the file is not, and no torch warning
    or traceback before it."""
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(5000))
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    objects = tmp_path / "objects.pt"
    torch.save({"when": datetime.date(2026, 1, 1)}, objects)
    for path, why in ((random_bytes, "torch cannot read it: [^()]+"),  # what torch meets depends on the bytes
                      (plain, r"torch cannot read it: Unsupported operand 149"),
                      (objects, r"it holds pickled Python objects \(datetime.date\), which dist-cache never "
                                r"unpickles")):
        args = ["eval", "--checkpoint", str(path), "--cache", str(tmp_path / "absent.zarr")]
        if path == plain:  # the one torch warns about: in a process of its own, where nothing catches warnings
            done = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120)
            code, output = done.returncode, done.stderr
        else:
            result = CliRunner().invoke(cli.main, args)
            code, output = result.exit_code, result.output
        assert code == 2 and len(output.splitlines()) == 1, output
        assert re.fullmatch(f"error: checkpoint {re.escape(str(path))}: not a dist-cache checkpoint \\({why}\\); "
                            "pass a best.pt or last.pt written by dist-cache train", output.strip()), output
    done = subprocess.run([sys.executable, "-m", "cli", "extract", "--manifest", str(motion_dataset / "val.csv"),
                           "--video-root", str(motion_dataset / "videos"), "--out", str(tmp_path / "s.zarr"),
                           "--model", "dist-tiny", "--pretrained", str(plain), "--decode-workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: --pretrained {plain}: not a weights file (torch cannot read it: Unsupported operand 149); pass "
        "CLIP's weights: a state dict from torch.save, an open_clip checkpoint, OpenAI's .pt archive or safetensors"
    ], done.stderr
    assert not (tmp_path / "s.zarr").exists()
