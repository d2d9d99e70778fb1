"""``make bench``: each measurement runs the code users run, and reports what it measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from teachcache.bench import (
    PAPER_TEACHERS,
    _strip_checksums,
    _time_steps,
    bench_integrity,
    bench_loader,
    machine,
    write_paper_store,
)
from teachcache.bench_report import write_results
from teachcache.cli import app
from tests.conftest import derived_config

runner = CliRunner()


def test_the_paper_store_carries_every_array_the_recipes_read(tmp_path):
    """Patches of the paper-size store carry softmax, maps, sketches and bases; features rebuild on the device."""
    from core.data.patches import PatchDataset, TargetRequest, targets_from_batch
    from core.terms import TERM_SPECS, targets_needed

    path = tmp_path / "paper.zarr"
    cases = write_paper_store(path, 1, (64, 64, 64), sketch_channels=4)
    teachers = tuple(f"{n}/all_folds" for n in PAPER_TEACHERS)
    request = TargetRequest.for_recipe(teachers, 2.0, targets_needed((n, 1.0) for n in TERM_SPECS))
    item = PatchDataset(path, cases, (32, 32, 32), length=2, targets=request)[0]
    for name, width in PAPER_TEACHERS.items():
        key = f"{name}/all_folds"
        assert item[f"softmax/{key}"].shape == (2, 32, 32, 32)
        assert torch.allclose(item[f"softmax/{key}"].sum(0), torch.ones(32, 32, 32), atol=1e-4)
        assert item[f"fine/{key}"].shape == (1, 16, 16, 16)
        assert item[f"fine_sketch/{key}"].shape == (4, 8, 8, 8), "the fine sketch is stored at stride 4"
        assert item[f"fine_basis/{key}"].shape == (width, 4)
    batch = {k: v[None] for k, v in item.items()}
    targets = targets_from_batch(batch, request, torch.device("cpu"))
    assert targets["fine_features"]["unetr/all_folds"].shape == (1, 768, 8, 8, 8)


def test_the_loader_is_measured_per_patch_size_and_workers(tmp_path):
    settings = {"cases": 1, "shape": (96, 96, 96), "patches": (32,), "workers": (0,), "batches": 2}
    result = bench_loader(settings, progress=lambda _: None)
    assert set(result["patches_per_s"]) == {"32"} and result["patches_per_s"]["32"]["0"] > 0
    assert result["files"] > 0 and result["store_bytes_per_voxel"] > 0
    files = result["sharding"]["files"]
    # one data file per array per entry when sharded; the per-chunk copy of the same store has more
    assert files["sharded"]["data_files_per_array"] == 1.0
    assert files["sharded"]["files_per_entry"] == 2 * files["sharded"]["arrays_per_entry"] + 1
    assert files["per_chunk"]["data_files_per_array"] > 1.0
    assert all(r > 0 for r in result["sharding"]["patches_per_s"].values())


def test_integrity_compares_the_loader_with_and_without_checksums_on_the_same_values(tmp_path):
    import shutil

    import numpy as np
    import zarr

    settings = {
        "cases": 1,
        "shape": (64, 64, 64),
        "patches": (32,),
        "workers": (0,),
        "batches": 2,
        "rounds": 1,
    }
    result = bench_integrity(settings, progress=lambda _: None)
    assert result["patches_per_s"]["crc32c"] > 0 and result["patches_per_s"]["none"] > 0
    assert result["check"]["groups"] == 1 + len(PAPER_TEACHERS) and result["check"]["bytes"] > 0
    assert result["hecktor"]["check_seconds"] == pytest.approx(result["check"]["seconds"] * 224)
    # the arm without checksums holds the same values, only without the codec
    write_paper_store(tmp_path / "a.zarr", 1, (64, 64, 64))
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "b.zarr")
    _strip_checksums(tmp_path / "b.zarr")
    a = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["teachers/unetr/all_folds/PAPER_000/softmax"]
    b = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["teachers/unetr/all_folds/PAPER_000/softmax"]
    assert type(a.compressors[-1]).__name__ == "Crc32cCodec"
    assert all(type(c).__name__ != "Crc32cCodec" for c in b.compressors)
    np.testing.assert_array_equal(a[...], b[...])


@pytest.mark.parametrize("kd,source", [("none", "cache"), (None, "cache"), (None, "online")])
def test_a_training_step_is_timed_as_training_runs_it(trained, kd, source):
    """The step timer builds the run as `make distil` does (cached or online targets) and times train_step."""
    from cache_teachers import cache_teachers

    root, data = trained
    cfg, path = derived_config(root, data, "bench_steps")
    from cache_teachers import preprocess_dataset

    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, progress=False)
    result = _time_steps(str(path), 0, kd, source, 3, 1)
    expected = (
        "kd-none"
        if kd == "none"
        else f"kd-{cfg.distillation.kind}" + ("-online-patch" if source == "online" else "")
    )
    assert result["kd"] == expected and result["steps"] == 3
    assert 0 < result["step_s"] <= result["step_with_loading_s"]
    assert result["peak_rss_mb"] >= result["rss_before_run_mb"] > 0


def test_results_replace_only_their_preset_block(tmp_path):
    settings = {"cases": 1, "shape": (64, 64, 64), "patches": (32,), "workers": (0,), "batches": 1}
    results = {
        "preset": "cpu",
        "machine": machine(),
        "config": "configs/demo.yaml",
        "loader": bench_loader(settings, progress=lambda _: None),
        "integrity": bench_integrity({**settings, "rounds": 1}, progress=lambda _: None),
        "seconds": 1.0,
    }
    results["loader"]["student_consumption"] = {"patches_per_s": None, "from": "no GPU run yet"}
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(
        "# Benchmarks\n\nhand-written analysis\n\n<!-- bench:gpu -->\nold gpu\n<!-- /bench:gpu -->\n"
    )
    for _ in range(2):
        write_results(results, tmp_path / "bench", benchmarks)
    text = benchmarks.read_text()
    assert "hand-written analysis" in text and "old gpu" in text
    assert text.count("<!-- bench:cpu -->") == 1 and "Patch loader at the paper's sizes" in text
    assert "with every chunk's CRC-32C checked" in text and "HECKTOR-sized" in text
    assert "one shard per array (format 2.3)" in text
    stored = json.loads((tmp_path / "bench" / "results-cpu.json").read_text())
    assert stored["loader"]["patches_per_s"]["32"]["0"] == pytest.approx(
        results["loader"]["patches_per_s"]["32"]["0"]
    )
    assert (tmp_path / "bench" / "results-cpu.png").stat().st_size > 0
    assert np.isfinite(stored["seconds"])


@pytest.mark.parametrize(
    "args,needle",
    [(["--preset", "tpu"], "unknown bench preset 'tpu'"), (["--part", "gpus"], "unknown bench part")],
)
def test_bad_bench_arguments_are_one_message(args, needle):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output


def test_break_even_is_the_fewest_students_for_which_caching_is_cheaper():
    from teachcache.bench import break_even

    # cache 100 s; a cached run 10 s, an online run 60 s: 50 s saved per student, so 2 students pay for the cache
    assert break_even(100.0, 10.0, 60.0) == 2
    assert break_even(30.0, 40.0, 120.0) == 1, "a cache cheaper than one run's saving pays at once"
    assert break_even(100.0, 60.0, 60.0) is None, "an online run no dearer than a cached one never pays back"


def test_the_gpu_preset_runs_end_to_end_as_a_smoke_test(tmp_path):
    """`make bench BENCH=gpu-smoke`: the GPU preset's code path — the paper's architectures (small), randomly
    initialised teachers, AMP asked for, every part including the online-context steps and the amortisation — on
    this CPU, through the CLI, writing its results and its BENCHMARKS block."""
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parent.parent
    data = yaml.safe_load((repo / "configs" / "bench-gpu-smoke.yaml").read_text())
    data["dataset"]["raw_dir"] = str(tmp_path / "raw")
    data["store"]["path"] = str(tmp_path / "store.zarr")
    data["output"]["runs_dir"] = str(tmp_path / "runs")
    for t in data["teachers"]:
        t["checkpoint"] = str(tmp_path / "teachers" / t["name"] / "teacher.pth")
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    for command in (["synth"], ["preprocess"]):
        result = runner.invoke(app, [*command, "-c", str(config), "-q"])
        assert result.exit_code == 0, result.output
    benchmarks = tmp_path / "BENCHMARKS.md"
    result = runner.invoke(
        app,
        [
            "bench",
            "--preset",
            "gpu-smoke",
            "-c",
            str(config),
            "--out",
            str(tmp_path / "bench"),
            "--benchmarks",
            str(benchmarks),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "bench" / "results-gpu-smoke.json").read_text())
    assert set(found) >= {"steps", "store", "cache", "amortise", "loader", "integrity"}
    runs = found["steps"]["runs"]
    assert set(runs) == {"a", "b", "c", "c_context"}
    assert (
        runs["c_context"]["kd"] == "kd-teachformer-online-context" and runs["c"]["source"] == "online-patch"
    )
    assert all(set(r["step_with_loading_by_workers_s"]) == {"0"} for r in runs.values())
    assert all(r["torch_threads"] == 1 for r in runs.values())
    assert "c/b with loading" in found["steps"]["ratios"]
    amortise = found["amortise"]
    assert set(amortise["table"]) == {"1", "3", "10"} and amortise["extrapolated"] == ["online-context"]
    assert amortise["measured"]["cached"]["kd"] == "kd-teachformer"
    text = benchmarks.read_text()
    assert "<!-- bench:gpu-smoke -->" in text and "Break-even k" in text and "with loading, 0 workers" in text


def test_one_byte_arrays_are_compressed_without_shuffle_and_mixed_stores_verify(tmp_path):
    """The store's codec rule (docs/store-format.md, "Softmax bytes"): no shuffle for 1-byte types, bit-shuffle for
    2-byte ones, byte shuffle wider; a store holding an entry written with the earlier bit-shuffled int8 codec beside
    entries written now reads and verifies alike (each array's zarr.json names its own codecs)."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    from core.store.format import compressor_for
    from core.store.teacher_store import TeacherStore

    shuffles = {
        d: compressor_for(np.dtype(d))[0].shuffle.value for d in ("int8", "uint8", "float16", "float32")
    }
    assert shuffles == {
        "int8": "noshuffle",
        "uint8": "noshuffle",
        "float16": "bitshuffle",
        "float32": "shuffle",
    }

    path = tmp_path / "paper.zarr"
    cases = write_paper_store(path, 2, (32, 32, 32), sketch_channels=4)
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    now = root[f"teachers/unetr/all_folds/{cases[0]}/softmax"]
    assert next(c for c in now.compressors if isinstance(c, BloscCodec)).shuffle.value == "noshuffle"
    # the other case's softmax as entries were written before the change: bit-shuffled, digests recorded with it
    entry = f"teachers/unetr/all_folds/{cases[1]}"
    old = root[f"{entry}/softmax"]
    values, attrs = old[...], dict(old.attrs)
    root[entry].create_array(
        "softmax",
        data=values,
        chunks=old.chunks,
        shards=old.shards,
        filters=old.filters,
        compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()],
        dimension_names=old.metadata.dimension_names,
        overwrite=True,
    )
    root[f"{entry}/softmax"].attrs.update(attrs)
    store = TeacherStore.open(path, mode="a")
    for key in ("chunk_digests", "attrs_digest"):
        del root[entry].attrs[key]
    store.record_digests(root[entry], entry)
    reopened = zarr.open_group(str(path), mode="r", use_consolidated=False)
    assert (
        next(c for c in reopened[f"{entry}/softmax"].compressors if isinstance(c, BloscCodec)).shuffle.value
        == "bitshuffle"
    )
    np.testing.assert_array_equal(reopened[f"{entry}/softmax"][...], values)
    # the digest check `verify` and `distil` run (this store, written directly, records no teacher provenance)
    groups = [f"cases/{c}" for c in cases] + [
        f"teachers/{t}/all_folds/{c}" for t in PAPER_TEACHERS for c in cases
    ]
    found = TeacherStore.open(path).check_groups(groups)
    assert all(g.ok for g in found), [g.path for g in found if not g.ok]


def test_the_amortisation_weighs_measured_runs_and_extrapolates_context_at_the_runs_workers():
    from teachcache.bench import amortisation

    cache = {"cache_s": 40.0, "cases": 20, "teachers": 3}
    steps = {
        "runs": {
            "b": {"step_with_loading_by_workers_s": {"0": 0.2, "2": 0.1}},
            "c_context": {"step_with_loading_by_workers_s": {"0": 3.2, "2": 1.1}},
        }
    }
    whole = {
        "cached": {"seconds": 70.0, "steps": 400, "workers": 0},
        "online-patch": {"seconds": 190.0, "steps": 400, "workers": 0},
    }
    found = amortisation(cache, steps, whole)
    # context = the cached run + 400 steps × (3.2 − 0.2) s at the runs' 0 workers, not at either arm's fastest
    assert found["run_s"]["online-context"] == pytest.approx(70.0 + 400 * 3.0)
    assert found["table"]["3"] == {
        "cache_then_students_s": pytest.approx(40 + 3 * 70),
        "online-patch_s": pytest.approx(3 * 190),
        "online-context_s": pytest.approx(3 * 1270),
    }
    assert found["break_even_k"] == {"online-patch": 1, "online-context": 1}
    assert found["measured"].keys() == {"cached", "online-patch"} and found["extrapolated"] == [
        "online-context"
    ]
