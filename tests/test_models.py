"""Registry, taps and checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from core.errors import CheckpointError, ConfigError
from core.models import TapRecorder, create_model, get_spec, list_models
from core.models.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from core.models.registry import ModelSpec, TapSpec, register_model

SMALL_ARGS = {
    "unetr": {"img_size": 32, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
    "swin_unetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24]},
    "dynunet": {"filters": [4, 8, 16, 32, 48]},
    "basic_unet": {"features": [4, 4, 8, 16, 32, 4]},
    "uxnet": {"widths": [4, 8, 16, 32], "depths": [1, 1, 1, 1], "hidden_size": 32},
    "uxnet_light": {},
    "hdenseformer": {"img_size": 32, "n_filters": 4, "transformer_depth": 4, "growth_rate": 8, "heads": 2},
    "hdenseformer_light": {"img_size": 32},
}


def test_every_registered_model_has_small_test_args():
    assert sorted(SMALL_ARGS) == list_models()


@pytest.mark.parametrize("name", sorted(SMALL_ARGS))
def test_taps_have_the_declared_strides(name):
    spec = get_spec(name)
    model = create_model(name, 2, 3, SMALL_ARGS[name]).eval()
    x = torch.randn(1, 2, 32, 32, 32) if name != "swin_unetr" else torch.randn(1, 2, 64, 64, 64)
    with TapRecorder(model, spec.taps) as rec, torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, *x.shape[2:])
    for tap_name, tap in spec.taps.items():
        feat = rec.features[tap_name]
        assert feat.shape[2:] == tuple(s // tap.stride for s in x.shape[2:]), (name, tap_name)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks removed on exit"


def test_unknown_tap_path_and_duplicate_registration():
    model = create_model("basic_unet", 1, 2, SMALL_ARGS["basic_unet"])
    with (
        pytest.raises(KeyError, match="tap module 'down_9' not found"),
        TapRecorder(model, {"x": TapSpec("down_9", 16)}),
    ):
        pass
    spec = get_spec("basic_unet")
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec("basic_unet", spec.build, spec.coarse, spec.fine, 16))
    with pytest.raises(ConfigError, match="unknown architecture 'nope'"):
        get_spec("nope")


def test_checkpoint_roundtrip_records_how_to_rebuild(tmp_path):
    args = SMALL_ARGS["dynunet"]
    model = create_model("dynunet", 2, 2, args)
    save_checkpoint(tmp_path / "c.pth", model, "dynunet", 2, 2, args, {"fold": 0, "train_cases": ["a"]})
    rebuilt, ckpt = build_from_checkpoint(tmp_path / "c.pth", "dynunet", 2, 2, args)
    assert ckpt.arch == "dynunet" and ckpt.meta["train_cases"] == ["a"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k])


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_foreign_checkpoint_wrappers(tmp_path, wrap):
    args = SMALL_ARGS["basic_unet"]
    sd = create_model("basic_unet", 2, 2, args).state_dict()
    payload = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(payload, tmp_path / "f.pt")
    model, ckpt = build_from_checkpoint(tmp_path / "f.pt", "basic_unet", 2, 2, args)
    assert ckpt.arch is None and torch.equal(model.state_dict()["final_conv.weight"], sd["final_conv.weight"])


def test_wrong_architecture_or_channels_is_explained(tmp_path):
    save_checkpoint(
        tmp_path / "d.pth",
        create_model("dynunet", 2, 2, SMALL_ARGS["dynunet"]),
        "dynunet",
        2,
        2,
        SMALL_ARGS["dynunet"],
    )
    with pytest.raises(CheckpointError, match="holds a 'dynunet' network but the config declares 'unetr'"):
        build_from_checkpoint(tmp_path / "d.pth", "unetr", 2, 2, SMALL_ARGS["unetr"])
    with pytest.raises(CheckpointError, match="2 input channel"):
        build_from_checkpoint(tmp_path / "d.pth", "dynunet", 3, 2, SMALL_ARGS["dynunet"])
    torch.save(create_model("basic_unet", 3, 2, SMALL_ARGS["basic_unet"]).state_dict(), tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): conv_0.conv_0.conv.weight"):
        build_from_checkpoint(tmp_path / "raw.pt", "basic_unet", 2, 2, SMALL_ARGS["basic_unet"])


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pth")


@pytest.mark.parametrize("damage", ["random bytes", "damaged pickle", "truncated zip"])
def test_a_damaged_checkpoint_is_called_unreadable_not_unsafe(tmp_path, damage):
    path = tmp_path / "teacher.pth"
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "damaged pickle":
        path.write_bytes(b"\x80\x04" + np.random.default_rng(1).bytes(4096))
    else:
        torch.save({"w": torch.zeros(100, 100)}, path)
        path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        load_checkpoint(path)
    assert "unsafe" not in str(info.value) and "run code" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "args", "in_channels", "published_millions"),
    [
        ("unetr", {"img_size": 96}, 1, 92.8),
        ("swin_unetr", {}, 1, 62.2),
        ("uxnet", {}, 1, 53.0),
    ],
)
def test_published_parameter_counts_within_two_percent(name, args, in_channels, published_millions):
    model = create_model(name, in_channels, 14, args)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - published_millions) / published_millions < 0.02, count


def test_models_command_lists_every_model_with_flops():
    import json

    from typer.testing import CliRunner

    from teachcache.cli import app

    result = CliRunner().invoke(
        app, ["models", "--input-size", "64", "--in-channels", "2", "--out-channels", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) == set(list_models())
    assert all(r["parameters"] > 0 and r["gflops"] > 0 for r in rows.values())
    assert rows["uxnet_light"]["gflops"] * 10 <= rows["unetr"]["gflops"]
    assert rows["hdenseformer_light"]["parameters"] * 5 <= rows["hdenseformer"]["parameters"]


def test_a_model_that_cannot_run_at_the_size_is_listed_as_skipped_not_a_traceback():
    from typer.testing import CliRunner

    from teachcache.cli import app

    result = CliRunner().invoke(app, ["models", "--input-size", "32"])
    assert result.exit_code == 0, result.output
    words = " ".join(w for w in result.output.split() if w != "│")  # the table's cells, read across its rows
    assert "Traceback" not in result.output and "'swin_unetr' cannot run on a 32³ input" in words


def test_optional_extras_are_named_in_help_as_pip_takes_them():
    from typer.testing import CliRunner

    from teachcache.cli import app

    result = CliRunner().invoke(app, ["view", "--help"], terminal_width=200)
    assert "teachcache[viewer]" in result.output


def test_hdenseformer_takes_two_or_three_modalities_and_keeps_the_published_key_layout():
    args = SMALL_ARGS["hdenseformer"]
    for modalities in (2, 3):
        model = create_model("hdenseformer", modalities, 2, args).eval()
        assert len(model.attns) == modalities, "one transformer path per modality"
        with torch.no_grad():
            assert model(torch.randn(1, modalities, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    keys = set(create_model("hdenseformer", 2, 2, args).state_dict())
    published = {  # names in the authors' checkpoints, which load without remapping
        "attns.0.patch_embeddings.weight",
        "attns.1.position_embeddings",
        "attns.0.blocks.0.0.layers.0.0.weight",
        "attns.0.blocks.0.0.layers.0.1.fn.to_qkv.weight",
        "attns.0.blocks.0.0.layers.3.2.fn.net.3.weight",
        "attns.0.blocks.0.0.out_layer.net.0.weight",
        "deep_conv.double_conv.0.weight",
        "block_4_2_left.norm.weight",
        "upconv_3.weight",
        "block_1_2_right.conv.weight",
        "conv1x1.weight",
        "conv1x1_d3.weight",
    }
    assert published <= keys
