"""Online distillation in context: a patch's targets from the cache's own windows equal the store's targets.

The drift test of issue 23: with augmentation off, the context-mode targets of a patch are the store's decoded
targets for that patch — softmax within the encoding's error (mean KL per voxel ≤ 1e-3 nats at T = 1 and T = 4),
each attention map with cosine ≥ 0.99 — for a transformer (UNETR) and a CNN (DynUNet) teacher, for a patch at the
volume's edge and one in its middle. The teachers are seeded random initialisations cached by the real cache stage
over 64³ volumes, so a middle patch meets 27 of UNETR's windows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from core.data.patches import PatchDataset, TargetRequest, crop_map, fine_alignment
from core.store.teacher_store import TeacherStore
from core.teachers.context import ContextTargets, ContextTeacher, window_starts
from teachcache.cli import app
from tests.conftest import TINY_TEACHER_TRAINING, cache_random_teachers, tiny_config_dict

runner = CliRunner()
TEACHERS = ("unetr", "dynunet")  # a transformer and a CNN
PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def context_store(tmp_path_factory) -> Path:
    """Seeded random UNETR and DynUNet checkpoints, cached over 64³ cases; returns the config's path."""

    root = tmp_path_factory.mktemp("context")
    data = tiny_config_dict(root)
    data["dataset"]["synthetic"].update(num_cases=4, shape=[80, 80, 32])
    data["preprocessing"]["min_size"] = [64, 64, 64]
    data["teachers"] = [t for t in data["teachers"] if t["name"] in TEACHERS]
    data["splits"]["num_folds"] = 2
    data["training"] = {**TINY_TEACHER_TRAINING, "epochs": 1, "iterations_per_epoch": 2, "val_every": 1}
    return cache_random_teachers(root, data, seed=200)


def _context(cfg, name: str, temperature: float) -> tuple[ContextTargets, str]:
    from core.models import get_spec
    from core.models.checkpoint import build_from_checkpoint

    teacher = cfg.teacher(name)
    model, _ = build_from_checkpoint(teacher.checkpoint, teacher.arch, 2, 2, teacher.args)
    key = teacher.store_key(0)
    request = TargetRequest(teachers=(key,), temperature=temperature)
    one = ContextTeacher(key, model, get_spec(teacher.arch), cfg.inference_for(teacher))
    return ContextTargets([one], request, cfg.distillation.attention.p, torch.device("cpu")), key


def _case(store: TeacherStore) -> str:
    case = next((c for c in store.case_ids() if store.case_shape(c) == (64, 64, 64)), None)
    assert case is not None, [store.case_shape(c) for c in store.case_ids()]
    return case


def _mean_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over voxels of KL(p ‖ q) in nats, p and q (K, X, Y, Z)."""
    p, q = p.double().clamp_min(1e-12), q.double().clamp_min(1e-12)
    return float((p * (p.log() - q.log())).sum(0).mean())


@pytest.mark.parametrize("name", TEACHERS)
@pytest.mark.parametrize("start", [(0, 0, 0), (16, 16, 16)], ids=["edge", "middle"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_context_targets_equal_the_stores_for_the_same_patch(context_store, name, start, temperature):
    from core.config import load_config

    cfg = load_config(context_store)
    store = TeacherStore.open(cfg.store.path)
    case = _case(store)
    context, key = _context(cfg, name, temperature)
    got = context(store, case, start, PATCH)

    box = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
    cached = torch.from_numpy(store.read_softmax(key, case, box, temperature))
    online = got[f"softmax/{key}"]
    assert online.shape == cached.shape == (2, *PATCH)
    assert max(_mean_kl(online, cached), _mean_kl(cached, online)) <= 1e-3
    for kind in ("coarse", "fine"):
        amap, stride = store.read_attention(key, case, kind)
        want = crop_map(amap, stride, start, PATCH).flatten()
        have = got[f"{kind}/{key}"].flatten()
        assert have.shape == want.shape, kind
        assert torch.nn.functional.cosine_similarity(have, want, dim=0) >= 0.99, kind
    assert context.seconds > 0


def test_a_middle_patch_runs_exactly_the_windows_that_meet_it(context_store):
    """UNETR's 32³ windows at overlap 0.5 step 16 over 64³: a patch at 16 meets 3 per axis (27), one at 0 meets 2."""
    from core.config import load_config

    cfg = load_config(context_store)
    context, _ = _context(cfg, "unetr", 1.0)
    teacher = context.teachers[0]
    assert window_starts((64, 64, 64), (32, 32, 32), (0.5, 0.5, 0.5)) == [[0, 16, 32]] * 3
    box, count = context.context_box(teacher, (64, 64, 64), (16, 16, 16), PATCH)
    assert count == 27 and box == (slice(0, 64),) * 3
    box, count = context.context_box(teacher, (64, 64, 64), (0, 0, 0), PATCH)
    assert count == 8 and box == (slice(0, 48),) * 3


def test_context_patches_are_the_cached_patches_augmented_alike(context_store):
    """Through the patch dataset, with augmentation on: the same boxes and flips/rotations as the cached run draws,
    applied to the context maps as to the cached ones."""
    from core.config import load_config

    cfg = load_config(context_store)
    store = TeacherStore.open(cfg.store.path)
    context, key = _context(cfg, "dynunet", 2.0)
    cases = [_case(store)]
    kwargs = dict(length=4, seed=3, foreground_oversampling=0.5, targets=context.request)
    cached = PatchDataset(store.location, cases, PATCH, **kwargs)
    live = PatchDataset(
        store.location, cases, PATCH, context=context, align=cached.alignment(cases[0]), **kwargs
    )
    taps = fine_alignment([t.spec.taps["fine"].stride for t in context.teachers])
    assert cached.alignment(cases[0]) == taps > 1, "the registered taps' stride is the cached maps'"
    # a run that reads no target but must draw the cached run's patches snaps to the cached maps, case by case
    plain = PatchDataset(store.location, cases, PATCH, length=4, seed=3, align=context.request)
    assert plain.alignment(cases[0]) == cached.alignment(cases[0]) and set(plain[0]) == {"image", "label"}
    for i in range(4):
        a, b = cached[i], live[i]
        assert set(a) == set(b)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert _mean_kl(b[f"softmax/{key}"], a[f"softmax/{key}"]) <= 1e-3
        for kind in ("coarse", "fine"):
            cos = torch.nn.functional.cosine_similarity(
                a[f"{kind}/{key}"].flatten(), b[f"{kind}/{key}"].flatten(), dim=0
            )
            assert cos >= 0.99, (i, kind)


def test_a_student_distils_in_context_through_the_cli(context_store):
    """`teachcache distil --source online-context`: its own run folder, its source and teacher time recorded."""
    from core.config import load_config

    cfg = load_config(context_store)
    result = runner.invoke(
        app, ["distil", "-c", str(context_store), "--fold", "0", "--source", "online-context", "-q"]
    )
    assert result.exit_code == 0, result.output
    run = cfg.output.runs_dir / "students" / "kd-teachformer-online-context" / "fold_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["source"] == "online-context"
    assert summary["teacher_forward_seconds"] > 0
    assert summary["teacher_forward_seconds"] < summary["seconds"]


def test_context_mode_refuses_a_term_it_cannot_compute(context_store):
    import yaml

    data = yaml.safe_load(context_store.read_text())
    data["distillation"] = {"kind": "relation", "terms": [{"name": "affinity", "weight": 1.0}]}
    path = context_store.parent / "context-relation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(
        app, ["distil", "-c", str(path), "--fold", "0", "--source", "online-context", "-q"]
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "affinity read the store's feature sketches" in message and "online-context" in message


def test_unknown_source_is_refused(context_store):
    result = runner.invoke(
        app, ["distil", "-c", str(context_store), "--fold", "0", "--source", "context", "-q"]
    )
    assert result.exit_code != 0
    assert "online-context" in result.output


def test_every_arm_of_a_fold_draws_the_cached_runs_patches(context_store):
    """No distillation, cached, online-patch and online-context runs of one fold and seed train on the same boxes
    (the cached run's, snapped to its fine maps' stride): the arms differ in their targets only."""
    from core.config import load_config
    from train_student.distil import student_run

    cfg = load_config(context_store)
    arms = {
        "none": student_run(cfg, 0, kd="none"),
        "cache": student_run(cfg, 0),
        "online-patch": student_run(cfg, 0, source="online-patch"),
        "online-context": student_run(cfg, 0, source="online-context"),
    }
    assert arms["none"].dataset.alignment(arms["none"].dataset.case_ids[0]) > 1
    for i in range(6):
        images = {name: run.dataset[i]["image"] for name, run in arms.items()}
        for name, image in images.items():
            assert torch.equal(image, images["cache"]), (i, name)


def test_the_no_kd_runs_key_ignores_the_recipe_it_does_not_read(context_store):
    """Changing a config's default recipe leaves its finished no-KD runs recognised (their key is the same), while
    the distilled run's key changes with the recipe. (A recipe that reads maps of another stride would change the
    grid every arm's patches snap to, no-KD's included: that is hashed as the run's ``align``.)"""
    from core.config import TermConfig, load_config
    from core.training.run import run_key
    from train_student.distil import student_run

    cfg = load_config(context_store)
    other = cfg.model_copy(
        update={
            "distillation": cfg.distillation.model_copy(
                update={
                    "terms": [
                        TermConfig(name="pwd", weight=0.5, args={"balance": "class", "regions": "label"}),
                        TermConfig(name="afs"),
                    ]
                }
            )
        }
    )
    assert run_key(student_run(cfg, 0, kd="none")) == run_key(student_run(other, 0, kd="none"))
    assert run_key(student_run(cfg, 0)) != run_key(student_run(other, 0))


def test_runs_record_their_code_and_the_entries_their_teachers_are(context_store):
    """A cached run and its online twins record the same teacher entry keys (what the cache holds for those
    teachers), the code's commit, and what their key hashes — what the report checks before pooling them."""
    from core.config import load_config
    from core.store.provenance import entry_hash

    cfg = load_config(context_store)
    for source in ("cache", "online-patch"):
        result = runner.invoke(
            app, ["distil", "-c", str(context_store), "--fold", "0", "--source", source, "-q"]
        )
        assert result.exit_code == 0, result.output
    store = TeacherStore.open(cfg.store.path)
    summaries = {
        kind: json.loads((cfg.output.runs_dir / "students" / kind / "fold_0" / "summary.json").read_text())
        for kind in ("kd-teachformer", "kd-teachformer-online-patch")
    }
    cached = summaries["kd-teachformer"]
    first = store.case_ids()[0]
    assert {k: entry_hash(v) for k, v in cached["teacher_entry_keys"].items()} == {
        key: store.entry_attrs(key, first)["entry_hash"] for key in ("unetr/all_folds", "dynunet/all_folds")
    }
    assert summaries["kd-teachformer-online-patch"]["teacher_entry_keys"] == cached["teacher_entry_keys"]
    assert len(cached["code"]["commit"]) == 40 and isinstance(cached["code"]["dirty"], bool)
    assert (
        hashlib.sha256(json.dumps(cached["run_fields"], sort_keys=True).encode()).hexdigest()
        == cached["run_key"]
    )


def test_interpolated_maps_read_the_neighbouring_windows_too(context_store):
    """A patch whose map cells are interpolated (24 voxels of a 16-voxel tap grid, starting off it) samples a cell
    beyond its last window; the context box takes the window that stitches that cell, as the cache's map has it."""
    from core.config import load_config

    cfg = load_config(context_store)
    no_overlap = cfg.inference_for(cfg.teacher("unetr")).model_copy(update={"overlap": 0.0})
    context, _ = _context(cfg, "unetr", 1.0)
    teacher = context.teachers[0]
    assert teacher.spec.taps["coarse"].stride == 16
    shifted = ContextTeacher(teacher.key, teacher.model, teacher.spec, no_overlap)
    box, count = context.context_box(shifted, (64, 64, 64), (8, 8, 8), (24, 24, 24))
    assert box == (slice(0, 64),) * 3 and count == 8, "cell 2 ([32, 48)) is sampled: its window is run"
    box, count = context.context_box(shifted, (64, 64, 64), (0, 0, 0), PATCH)
    assert box == (slice(0, 32),) * 3 and count == 1, "a patch on the grid cuts its cells: no neighbour read"
