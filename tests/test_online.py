"""Online distillation: the fold's teachers in memory give the targets the cache gives, and a student trains from
them without any cached teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.data.patches import PatchDataset, TargetRequest
from core.models import get_spec
from core.models.checkpoint import build_from_checkpoint, file_sha256
from core.store.teacher_store import TeacherStore
from core.teachers.online import OnlineTargets
from teachcache.cli import app
from tests.conftest import derived_config

runner = CliRunner()


def test_online_targets_equal_the_cached_ones_on_the_same_view(trained):
    """A patch that is the whole (32³) volume, not augmented: the teacher sees what the cache's one window saw."""
    root, data = trained
    cfg, _ = derived_config(root, data, "online_equal", **{"distillation.teachers": ["dynunet"]})
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    store = TeacherStore.open(cfg.store.path)
    case = next(c for c in store.case_ids() if store.case_shape(c) == (32, 32, 32))
    request = TargetRequest(teachers=("dynunet/all_folds",), temperature=2.0)
    cached = PatchDataset(store.location, [case], (32, 32, 32), length=1, targets=request, augment=False)[0]
    teacher = cfg.teacher("dynunet")
    model, _ = build_from_checkpoint(teacher.checkpoint, teacher.arch, 2, 2, teacher.args)
    live = OnlineTargets(
        [("dynunet/all_folds", model, get_spec("dynunet"))], request, 2.0, torch.device("cpu")
    )
    online = live({"image": cached["image"][None]})
    probs = online["softmax"]["dynunet/all_folds"][0]
    assert probs.shape == cached["softmax/dynunet/all_folds"].shape
    assert (probs - cached["softmax/dynunet/all_folds"]).abs().max() < 0.02, "the encoding's error only"
    for kind in ("coarse", "fine"):
        a, b = online[kind]["dynunet/all_folds"][0].flatten(), cached[f"{kind}/dynunet/all_folds"].flatten()
        assert a.shape == b.shape
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999, kind
        assert np.isclose(float(a.pow(2).mean().sqrt()), 1.0, atol=1e-4), "unit RMS, as the store keeps maps"


def test_online_targets_refuse_kinds_only_the_cache_has():
    """Teachers in memory give softmax and attention maps; a request for sketches or features is a mistake."""
    from core.terms import targets_needed

    relation = TargetRequest.for_recipe(["t/all_folds"], 2.0, targets_needed([("affinity", 1.0)]))
    with pytest.raises(ValueError, match="not feature sketches"):
        OnlineTargets([], relation, 2.0, torch.device("cpu"))


def test_a_student_distils_online_from_checkpoints_with_nothing_cached(trained):
    root, data = trained
    cfg, path = derived_config(
        root,
        data,
        "online_run",
        **{
            "distillation.teachers": ["dynunet", "unetr"],
            "training.epochs": 1,
            "training.iterations_per_epoch": 2,
        },
    )
    preprocess_dataset(cfg, progress=False)  # no `make cache`: the teachers run in memory
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "--source", "online", "-q"])
    assert result.exit_code == 0, result.output
    # "online" is online-patch's old name: the same run, in its named folder
    run = cfg.output.runs_dir / "students" / "kd-teachformer-online-patch" / "fold_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["source"] == "online-patch" and summary["epochs_run"] == 1
    assert 0 < summary["teacher_forward_seconds"] < summary["seconds"]
    assert "student kd-teachformer-online-patch: val Dice" in result.output
    assert summary["teachers"] == {
        "dynunet/all_folds": file_sha256(cfg.teacher("dynunet").checkpoint),
        "unetr/all_folds": file_sha256(cfg.teacher("unetr").checkpoint),
    }
    assert TeacherStore.open(cfg.store.path).teacher_keys() == [], "nothing was cached"


def test_terms_on_cached_sketches_are_refused_online(trained):
    root, data = trained
    _, path = derived_config(
        root,
        data,
        "online_refused",
        **{"distillation.kind": "relation", "distillation.terms": [{"name": "affinity", "weight": 1.0}]},
    )
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "--source", "online", "-q"])
    assert result.exit_code == 2, result.output
    assert "affinity read the store's feature sketches" in " ".join(result.output.split())


@pytest.mark.parametrize("magnitude", [1.0, 1e-20, 1e-37])
def test_online_maps_are_scaled_as_the_store_scales_them_however_small(magnitude):
    """A deep tap's attention map can be ~1e-37 (the demo's DynUNet and SwinUNETR bottlenecks at p = 2): online and
    context targets must scale it to unit RMS as the store's writer does, not flush it to zero (they did, through a
    float32 norm with a 1e-12 floor: the coarse AFS term of two of three demo teachers trained on zeros)."""
    import numpy as np

    from core.store.writing import _unit_rms
    from core.teachers.online import unit_rms

    rng = np.random.default_rng(0)
    base = rng.random((2, 4, 4, 4)).astype(np.float32) + 0.1
    maps = torch.from_numpy(base * np.float32(magnitude))
    assert maps.abs().min() > 0, "the map is representable in float32"
    online = unit_rms(maps[:, None])[:, 0]
    for i in range(2):
        np.testing.assert_allclose(online[i].numpy(), _unit_rms(maps[i].numpy()), rtol=1e-5)
        assert float(online[i].pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(unit_rms(torch.zeros(1, 1, 2, 2, 2)), torch.zeros(1, 1, 2, 2, 2)), (
        "an all-zero map stays zero"
    )
