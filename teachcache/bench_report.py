"""``make bench``'s outputs: ``bench/results-<preset>.json``, a markdown table with the machine in its header, a
PNG chart, and the preset's block in ``BENCHMARKS.md`` (between ``<!-- bench:<preset> -->`` markers; the text
around the blocks is kept)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "markdown", "write_results"]

# the targets, per preset: (ratio or quantity, comparison, bar)
# (the verdicts use the step times with loading counted: what a run pays)
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "cpu": {"b/a with loading": ("<=", 1.15), "c/b with loading": (">=", 3.0), "memory b/a": ("<=", 1.1)},
    "gpu": {"b/a with loading": ("<=", 1.05), "c/b with loading": (">=", 5.0), "memory b/a": ("<=", 1.1)},
}
# the largest break-even k (students of one fold) at which caching pays, per preset
BREAK_EVEN_TARGET = {"cpu": 2, "gpu": 2}
STORE_TARGETS = {
    "softmax": 0.25,
    "entry": 1.0,
    "kl": 1e-4,
    "cache_overhead": 0.10,
    "loader_margin": 3.0,
    "crc_cost": 0.05,
}


def _met(value: float | None, op: str, bar: float) -> str:
    if value is None:
        return "—"
    ok = value <= bar if op == "<=" else value >= bar
    return "met" if ok else "**missed**"


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: machine header, then one table per measurement."""
    lines = _header(results)
    sections = (
        ("steps", _steps_section),
        ("store", _store_section),
        ("cache", _cache_section),
        ("amortise", _amortise_section),
        ("loader", _loader_section),
        ("integrity", _integrity_section),
    )
    for part, section in sections:
        if results.get(part):
            lines += section(results[part], results["preset"])
    return "\n".join(lines)


def _header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    return [
        f"### `make bench BENCH={results['preset']}` — {results.get('date', '')}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, GPU: {m['gpu'] or 'none'}. "
        f"Python {m['python']}, torch {m['torch']}, MONAI {m['monai']}, zarr {m['zarr']}, numpy {m['numpy']}. "
        f"Experiment: `{results['config']}`. Whole run: {results['seconds'] / 60:.1f} min."
        + (
            " Carried from earlier runs: "
            + ", ".join(f"{part} ({date})" for part, date in results["carried"].items())
            + "."
            if results.get("carried")
            else ""
        )
        + (f" Re-derived: {results['recomputed']}." if results.get("recomputed") else ""),
        "",
    ]


def _steps_section(steps: dict[str, Any], preset: str) -> list[str]:
    """One row per arm (its step times per loader workers and peak memory), then the ratios against the targets."""
    mem = steps["memory"]
    mem_name = "CUDA peak allocated MB" if mem == "cuda_peak_mb" else "peak RSS MB"
    a = steps["runs"]["a"]
    workers = [str(w) for w in steps.get("workers") or [a["workers"]]]
    by_workers = " | ".join(f"with loading, {w} workers" for w in workers)
    lines = [
        f"Training step, median after warm-up ({a['steps']} steps; online-context "
        f"{steps['runs'].get('c_context', a)['steps']}), batch {a['batch_size']}, patch "
        f"{'×'.join(map(str, a['patch_size']))}, device {a['device']}, PyTorch threads "
        f"{a.get('torch_threads', '?')}; each arm in its own process, timed with each loader worker count. "
        "Verdicts use the step with loading at each arm's fastest worker count (**bold**):",
        "",
        f"| run | distillation | ms / step (batch in memory, {workers[0]} workers) | {by_workers} | {mem_name} |",
        "|---|---|---:|" + "---:|" * len(workers) + "---:|",
    ]
    for label, run in steps["runs"].items():
        found = run.get("step_with_loading_by_workers_s") or {str(run["workers"]): run["step_with_loading_s"]}
        cells = [
            (f"**{found[w] * 1e3:.1f}**" if w == str(run["workers"]) else f"{found[w] * 1e3:.1f}")
            if w in found
            else "—"
            for w in workers
        ]
        lines.append(
            f"| ({label}) | {run['kd']} ({run['source']}) | {run['step_s'] * 1e3:.1f} | "
            + " | ".join(cells)
            + f" | {run[mem]:.0f} |"
        )
    lines += ["", "| ratio | measured | target | |", "|---|---:|---:|---|"]
    targets = TARGETS.get(preset, {})
    for name, value in steps["ratios"].items():
        op, bar = targets.get(name, ("", 0.0))
        lines.append(
            f"| {name} | {value:.2f} | {f'{op} {bar:g}' if op else ''} | {_met(value, op, bar) if op else ''} |"
        )
    return [*lines, ""]


def _amortise_section(found: dict[str, Any], preset: str) -> list[str]:
    """ "Cache once + k students" against "k online students", and the break-even k against its target."""
    modes = [m for m in found["run_s"] if m != "cached"]
    measured = found["measured"]
    lines = [
        f"What the cache saves (fold {found['fold']}): the cache stage ({found['cache_cases']} cases × "
        f"{found['cache_teachers']} teachers) {found['cache_s']:.0f} s, then one whole student run each — "
        + ", ".join(
            f"{mode} {secs:.0f} s"
            + (
                " (measured)"
                if mode in measured
                else " (extrapolated: the cached run plus its step difference at "
                f"{found.get('extrapolated_at_workers', '?')} loader workers, the runs' own)"
            )
            for mode, secs in found["run_s"].items()
        )
        + f"; {measured['cached']['steps']} steps per run:",
        "",
        "| k students | cache once + k cached (s) | " + " | ".join(f"k {m} (s)" for m in modes) + " |",
        "|---:|---:|" + "---:|" * len(modes),
    ]
    for k, row in found["table"].items():
        lines.append(
            f"| {k} | {row['cache_then_students_s']:.0f} | "
            + " | ".join(f"{row[f'{m}_s']:.0f}" for m in modes)
            + " |"
        )
    bar = BREAK_EVEN_TARGET.get(preset)
    verdicts = []
    for mode in modes:
        k = found["break_even_k"][mode]
        verdict = f" ({_met(k, '<=', bar)} ≤ {bar})" if bar and k is not None else ""
        verdicts.append(f"{mode}: {k if k is not None else 'never'}{verdict}")
    return [
        *lines,
        "",
        "Break-even k (the fewest students for which caching is cheaper): " + "; ".join(verdicts) + ".",
        "",
    ]


def _store_section(store: dict[str, Any], preset: str) -> list[str]:
    """Bytes per voxel of each array kind, the whole entry and the softmax against their targets, files, HECKTOR."""
    kl = store["softmax_kl"]
    lines = [
        f"Store ({store['cases']} cases × {len(store['teachers'])} teachers): stored bytes per case voxel per "
        f"teacher; softmax encoding `{store['softmax_encoding']}`, KL to float32 at "
        + ", ".join(f"{t}: {v:.1e}" for t, v in kl.items())
        + f" ({_met(max(kl.values()), '<=', STORE_TARGETS['kl'])} ≤ 1e-4):",
        "",
        "| array | B / voxel / teacher |",
        "|---|---:|",
    ]
    lines += [f"| {kind} | {value:.3f} |" for kind, value in store["bytes_per_voxel_per_teacher"].items()]
    entry = store["entry_bytes_per_voxel_per_teacher"]
    softmax = store["bytes_per_voxel_per_teacher"].get("softmax")
    hecktor = store["hecktor"]
    return [
        *lines,
        f"| **whole entry** | **{entry:.3f}** ({_met(entry, '<=', STORE_TARGETS['entry'])} ≤ 1) |",
        "",
        f"Softmax {softmax:.3f} B/voxel ({_met(softmax, '<=', STORE_TARGETS['softmax'])} ≤ 0.25). Files per case "
        f"(images and every teacher): {store['files_per_case']:.0f}; per case per teacher "
        f"{store['teacher_files_per_case_per_teacher']:.0f}. A HECKTOR-sized store ({hecktor['cases']} "
        f"cases of {'×'.join(map(str, hecktor['shape']))}, {hecktor['teachers']} teachers): "
        f"{hecktor['teacher_gb']:.1f} GB of teacher entries + {hecktor['cases_gb']:.1f} GB of "
        "images and labels (extrapolated).",
        "",
    ]


def _cache_section(cache: dict[str, Any], preset: str) -> list[str]:
    """``cache`` against bare inference, and its phases."""
    return [
        f"Cache stage ({cache['cases']} cases × {cache['teachers']} teachers): `cache` took "
        f"{cache['cache_s']:.1f} s against {cache['bare_inference_s']:.1f} s of bare sliding-window inference: "
        f"overhead {cache['overhead'] * 100:.0f} % ({_met(cache['overhead'], '<=', STORE_TARGETS['cache_overhead'])}"
        " ≤ 10 %). Its parts, timed one by one:",
        "",
        "| phase | s |",
        "|---|---:|",
        f"| inference with taps (and features for sketches) | {cache['inference_with_taps_s']:.1f} |",
        f"| sketches (PCA, relation errors) | {cache['sketches_s']:.1f} |",
        f"| encode + compress + write | {cache['encode_write_s']:.1f} |",
        f"| bare inference, for reference | {cache['bare_inference_s']:.1f} |",
        "",
    ]


def _integrity_section(found: dict[str, Any], preset: str) -> list[str]:
    """CRC-32C's cost to the loader against its target, and the digest check's seconds."""
    rate = found["patches_per_s"]
    cost = found["crc_cost"]
    check = found["check"]
    lines = [
        f"Integrity, on a store of {found['cases']} cases of {'×'.join(map(str, found['shape']))} (three teachers' "
        f"every array): the loader at {found['patch']}³, 0 workers, reads {rate['crc32c']:.2f} patches/s with every "
        f"chunk's CRC-32C checked and {rate['none']:.2f} without the codec (medians of {len(found['rounds']['none'])} "
        f"interleaved rounds): cost {100 * cost:+.1f} % (median of the rounds' paired ratios) ({_met(cost, '<=', STORE_TARGETS['crc_cost'])} ≤ 5 %).",
        "",
        "| digest check before training | groups | MB read | s |",
        "|---|---:|---:|---:|",
        f"| this store (every case and entry) | {check['groups']} | {check['bytes'] / 1e6:.0f} | {check['seconds']:.2f} |",
    ]
    demo = found.get("demo")
    if demo:
        lines.append(
            f"| the demo's fold 0 (its cases, its teachers' training entries) | {demo['groups']} | "
            f"{demo['bytes'] / 1e6:.1f} | {demo['seconds']:.2f} |"
        )
    h = found["hecktor"]
    lines += [
        f"| HECKTOR-sized: {h['cases']} cases of {'×'.join(map(str, h['shape']))}, {h['teachers']} teachers "
        f"(extrapolated per case) | | | {h['check_seconds']:.0f} |",
        "",
    ]
    return lines


def _loader_section(loader: dict[str, Any], preset: str) -> list[str]:
    """Patches per second per patch size and workers, against the student's consumption."""
    consumption = loader.get("student_consumption", {})
    rate = consumption.get("patches_per_s")
    workers = sorted({w for r in loader["patches_per_s"].values() for w in r}, key=int)
    lines = [
        f"Patch loader at the paper's sizes: {loader['cases']} cases of {'×'.join(map(str, loader['shape']))}, "
        f"teachers {', '.join(loader['teachers'])} with every array TeachFormer, relation and MSKD read "
        f"({loader['store_bytes_per_voxel']:.2f} B/voxel stored, {loader['files']} files), batch "
        f"{loader['batch_size']}; patches per second:",
        "",
        "| patch | " + " | ".join(f"{w} workers" for w in workers) + " |",
        "|---|" + "---:|" * len(workers),
    ]
    for patch, by_workers in loader["patches_per_s"].items():
        lines.append(f"| {patch}³ | " + " | ".join(f"{by_workers[w]:.2f}" for w in workers) + " |")
    consumed = (
        f"{rate:.2f} patches/s, from {consumption['from']}." if rate else f"unknown: {consumption['from']}."
    )
    return [
        *lines,
        "",
        f"Student consumption at that size: {consumed} Target: the loader ≥ 3× the consumption with the default "
        "workers.",
        "",
        *_sharding_lines(loader.get("sharding")),
    ]


def _sharding_lines(found: dict[str, Any] | None) -> list[str]:
    """Files per entry and the loader's rate with one shard per array against one file per chunk."""
    if not found:
        return []
    sharded, per_chunk = found["files"]["sharded"], found["files"]["per_chunk"]
    rate = found["patches_per_s"]
    ratio = rate["sharded"] / rate["per_chunk"]
    goal = 2 * sharded["arrays_per_entry"] + 1
    return [
        "| store layout (same values) | files per entry | data files per array | loader "
        f"{found['patch']}³, 0 workers (patches/s) |",
        "|---|---:|---:|---:|",
        f"| one shard per array (format 2.3) | {sharded['files_per_entry']:.0f} | "
        f"{sharded['data_files_per_array']:.2f} | {rate['sharded']:.2f} |",
        f"| one file per chunk (format ≤ 2.2) | {per_chunk['files_per_entry']:.0f} | "
        f"{per_chunk['data_files_per_array']:.2f} | {rate['per_chunk']:.2f} |",
        "",
        f"Sharded: {sharded['files_per_entry']:.0f} files per entry against a goal of arrays × 2 + 1 = {goal:.0f} "
        f"({_met(sharded['files_per_entry'], '<=', goal)}); loader sharded / per chunk {ratio:.2f} "
        f"(goal ≥ 1 within noise: {_met(ratio, '>=', 0.95)}; median of {len(found['rounds']['sharded'])} "
        "interleaved rounds).",
        "",
    ]


def _steps_panel(ax: Any, results: dict[str, Any]) -> None:
    """Each arm's median step, with and without loading."""
    runs = results["steps"]["runs"]
    labels = [f"({k}) {r['kd']}\n{r['source']}" for k, r in runs.items()]
    ax.bar(labels, [r["step_s"] * 1e3 for r in runs.values()], color="tab:blue", label="batch in memory")
    ax.scatter(
        labels,
        [r["step_with_loading_s"] * 1e3 for r in runs.values()],
        color="k",
        label="with loading",
    )
    ax.set_ylabel("ms / training step (median)")
    ax.set_title("training step")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()


def _loader_panel(ax: Any, results: dict[str, Any]) -> None:
    """Patches per second per workers, one bar per patch size, against 3× the student's consumption."""
    rates = results["loader"]["patches_per_s"]
    width = 0.8 / len(rates)
    for i, (patch, by_workers) in enumerate(rates.items()):
        xs = [int(w) + i * width for w in by_workers]
        ax.bar(xs, list(by_workers.values()), width=width, label=f"{patch}³")
    consumption = results["loader"].get("student_consumption", {}).get("patches_per_s")
    if consumption:
        ax.axhline(3 * consumption, color="r", ls="--", label="3× student consumption")
    ax.set_xlabel("loader workers")
    ax.set_ylabel("patches / s")
    ax.set_title("paper-size patch loader")
    ax.legend()


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("steps", "loader") if p in results]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        (_steps_panel if panel == "steps" else _loader_panel)(ax, results)
    fig.suptitle(f"make bench BENCH={results['preset']} — {results['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(
    results: dict[str, Any], out_dir: Path, benchmarks: Path | None = Path("BENCHMARKS.md")
) -> None:
    """Write the JSON, markdown and PNG of one run, and replace its preset's block in ``benchmarks``."""
    results.setdefault("date", time.strftime("%Y-%m-%d"))
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = results["preset"]
    (out_dir / f"results-{preset}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    (out_dir / f"results-{preset}.md").write_text(table + "\n")
    _chart(results, out_dir / f"results-{preset}.png")
    if benchmarks is None:
        return
    block = f"<!-- bench:{preset} -->\n{table}\n\n![make bench BENCH={preset}]({out_dir.as_posix()}/results-{preset}.png)\n<!-- /bench:{preset} -->"
    text = benchmarks.read_text() if benchmarks.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{preset} -->.*?<!-- /bench:{preset} -->", re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    benchmarks.write_text(text)
