"""The training loop shared by demo teachers (stage 1) and students (stage 2).

It takes its data from a :class:`~core.data.patches.PatchDataset` and, when distilling, its targets from a
*target source*: a callable turning a batch into :data:`~core.losses.plain.DistillationTargets`. Today the source is
the store (cached maps carried in the batch); an online source computing the same targets from teachers in
memory plugs in behind the same callable.

Each epoch: ``iterations_per_epoch`` steps of Adam with a polynomial learning-rate decay, then (every
``val_every`` epochs, and always after the last) sliding-window validation on whole validation volumes, Dice per
class. Outputs in ``out_dir``: ``metrics.csv`` (one row per epoch), ``curves.png``, ``summary.json``,
``checkpoint_final.pth`` (the final model), ``checkpoint_selected.pth`` (with held-out cases: the epoch with the best
Dice on them), ``validation_per_case.csv`` (the headline model's Dice and HD95 per validation case and class) and
``checkpoint_best.pth``, the best-on-validation checkpoint (chosen on the cases it is scored on: labelled as such).

The headline model is chosen without looking at the validation cases: the final model (as nnU-Net reports), or,
when ``training.holdout`` carves cases out of the training cases, the epoch with the best Dice on those; early
stopping (``early_stopping_patience`` epochs without a better held-out Dice) uses the same signal.

A run's folder is replaced as a whole or not at all: everything is written into a staging folder beside it
(``.<name>.partial``) and swapped in when the run ends, so a killed or failed re-run leaves the previous run's
checkpoint, metrics and summary together and untouched. A loss term that becomes NaN or infinite stops the run at
once with a :class:`~core.errors.TrainingError` naming the term.

Resume: after every epoch the staging folder gets ``checkpoint_latest.pth`` (model, optimizer, scheduler, scaler
and RNG states, the metrics so far), written atomically. Re-running the same command after a kill continues from
the last complete epoch and ends exactly where an uninterrupted run ends (patches depend only on seed, epoch and
index); a partial run made with other settings (its ``run_key`` differs) is discarded and training starts afresh.
Testing hook: ``TEACHCACHE_TEST_KILL_AT_STEP=N`` SIGKILLs the process after its N-th training step.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from core.config import InferenceConfig, TrainingConfig
from core.data.patches import EpochSampler, PatchDataset
from core.errors import TrainingError
from core.evaluation.metrics import dice_per_class, hd95_per_class
from core.inference import autocast, predict_volume
from core.models.checkpoint import load_checkpoint, save_checkpoint
from core.models.registry import ModelSpec
from core.models.taps import TapRecorder
from core.progress import ProgressBar
from core.store.teacher_store import TeacherStore
from core.terms import DistillationTargets
from core.training import distributed
from core.training.distributed import Distributed

__all__ = [
    "FitResult",
    "Optimisation",
    "ResumeDiscardedWarning",
    "TrainingRun",
    "count_parameters",
    "evaluate",
    "fit",
    "recover_run_dir",
    "run_seed",
    "train_step",
]

LossFn = Callable[..., dict[str, torch.Tensor]]
TargetSource = Callable[[dict[str, torch.Tensor]], DistillationTargets]


@dataclass(frozen=True)
class FitResult:
    """What a training run produced (also written as ``summary.json``).

    The headline (``headline_*``, ``checkpoint``) is chosen without the validation cases: the **final** model
    (``final_*``, ``checkpoint_final.pth``), as nnU-Net reports, or the epoch with the best Dice on cases held out of
    training (``headline == "holdout"``). ``best_*`` is the epoch with the best validation Dice — chosen on the very
    cases it is scored on, so optimistic; shown beside the headline, labelled as such.
    """

    name: str
    arch: str
    parameters: int
    best_mean_dice: float
    best_dice_per_class: list[float]
    best_epoch: int
    epochs_run: int
    seconds: float
    checkpoint: str
    metrics_csv: str
    final_mean_dice: float = float("nan")
    final_dice_per_class: list[float] = field(default_factory=list)
    final_epoch: int = -1
    final_hd95_per_class: list[float] = field(default_factory=list)
    checkpoint_final: str = ""
    per_case_csv: str = ""
    headline: str = "final"
    headline_epoch: int = -1
    headline_mean_dice: float = float("nan")
    headline_dice_per_class: list[float] = field(default_factory=list)
    headline_hd95_per_class: list[float] = field(default_factory=list)
    holdout_cases: list[str] = field(default_factory=list)
    holdout_mean_dice: float | None = None
    world_size: int = 1
    replicas_identical: bool | None = None
    evaluated_in: str = "preprocessed grid"
    seconds_per_volume: float = float("nan")
    gflops_per_window: float | None = None


def _staging_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def _replaced_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.replaced"


KILL_AT_STEP_ENV = "TEACHCACHE_TEST_KILL_AT_STEP"
_LATEST = "checkpoint_latest.pth"
_FINAL, _SELECTED, _BEST = "checkpoint_final.pth", "checkpoint_selected.pth", "checkpoint_best.pth"
_OWN_CHECKPOINTS = (_FINAL, _SELECTED, _BEST, _LATEST)


def recover_run_dir(out_dir: Path, keep_staging: bool = False) -> None:
    """Bring a run folder back to a whole state after a process was killed while writing or swapping it.

    A leftover staging folder (a run killed before it finished) is removed, unless ``keep_staging`` (to resume
    from it); a previous run set aside by a swap that was cut between its two renames is put back.
    """
    staging, replaced = _staging_dir(out_dir), _replaced_dir(out_dir)
    if staging.exists() and not keep_staging:
        shutil.rmtree(staging)
    if replaced.exists():
        if out_dir.exists():
            shutil.rmtree(replaced)
        else:
            os.replace(replaced, out_dir)


def _publish_run_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished staging folder in for ``out_dir`` (two renames; :func:`recover_run_dir` mends a cut)."""
    replaced = _replaced_dir(out_dir)
    if out_dir.exists():
        os.replace(out_dir, replaced)
    os.replace(staging, out_dir)
    if replaced.exists():
        shutil.rmtree(replaced)


def _write_error(out_dir: Path, exc: OSError) -> TrainingError:
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return TrainingError(
        f"cannot write the run folder {out_dir}: {exc.strerror or exc}{where}. Free space or fix permissions, or set "
        "output.runs_dir to a writable location; nothing of this run was published (a previous run there is kept)"
    )


def _run_key(run: TrainingRun) -> str:
    """What a run is, hashed: a partial run is resumed only by the same run."""
    return hashlib.sha256(json.dumps(_run_fields(run), sort_keys=True, default=str).encode()).hexdigest()


def _run_fields(run: TrainingRun) -> dict[str, Any]:
    """What a run is: its settings, cases, seed and loss, as JSON-able values (flattened to dotted keys)."""
    payload = {
        "name": run.name,
        "arch": run.spec.name,
        "args": run.args,
        "num_classes": run.num_classes,
        "cases": list(run.dataset.case_ids),
        "patch": list(run.dataset.patch_size),
        "dataset_seed": run.dataset.seed,
        "length": len(run.dataset),
        "targets": repr(run.dataset.targets),
        "val_cases": list(run.val_cases),
        "holdout_cases": list(run.holdout_cases),
        "training": run.cfg.model_dump(mode="json"),
        "inference": run.inference.model_dump(mode="json"),
        "loss": getattr(run.loss_fn, "names", None),
        "loss_weights": getattr(run.loss_fn, "term_weights", None),
        "meta": run.meta or {},
    }
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_dotted(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


class ResumeDiscardedWarning(UserWarning):
    """A killed run was found in the staging folder, made with other settings: it is discarded, training starts
    afresh."""


def _warn_if_discarding(staging: Path, run: TrainingRun, key: str) -> None:
    """Say what differs when a killed run of other settings is about to be discarded."""
    path = staging / _LATEST
    if not path.is_file():
        return
    state: Any = None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable state: nothing to name
        state = None
    if isinstance(state, dict) and state.get("run_key") == key:
        return
    if not isinstance(state, dict):
        what = "is unreadable"
    elif "run_fields" not in state:
        what = "was written by an older TeachCache"
    else:
        before, now = _dotted(json.loads(state["run_fields"])), _dotted(_run_fields(run))
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        what = f"differs in {', '.join(changed[:6])}{'…' if len(changed) > 6 else ''}"
    warnings.warn(
        ResumeDiscardedWarning(
            f"{run.name}: the killed run in {staging} {what} — it cannot be resumed with these settings, so it is "
            "discarded and training starts afresh (restore the old settings before re-running to resume it instead)"
        ),
        stacklevel=3,
    )


def _finished_run(out_dir: Path, key: str, exported: Path | None) -> FitResult | None:
    """The result of the finished run in ``out_dir`` when it is the run ``key`` describes, else ``None``."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("run_key") != key or (exported is not None and not exported.is_file()):
        return None
    names = {f.name for f in fields(FitResult)}
    return FitResult(**{k: v for k, v in summary.items() if k in names})


def _resumable_state(staging: Path, key: str) -> dict[str, Any] | None:
    """The latest state of a killed run with the same key, or ``None`` (no partial run, or another run's)."""
    path = staging / _LATEST
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable state is no state: start afresh
        return None
    return state if isinstance(state, dict) and state.get("run_key") == key else None


def _save_latest(
    path: Path,
    key: str,
    fields_of_run: dict[str, Any],
    epoch: int,
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    rows: list[dict[str, Any]],
    best: tuple[float, list[float], int],
    stale: int,
    last: tuple[float, list[float], int, np.ndarray, np.ndarray],
    seconds: float,
    selected: tuple[float, int, list[float], np.ndarray, np.ndarray],
) -> None:
    """Everything needed to continue after ``epoch``, written atomically (loadable with ``weights_only=True``)."""
    state = {
        "run_key": key,
        "run_fields": json.dumps(fields_of_run),
        "epoch": epoch,
        "model": model.state_dict(),
        "loss": loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rows": rows,
        "best": [best[0], list(best[1]), best[2]],
        "stale": stale,
        "last": [last[0], list(last[1]), last[2], np.asarray(last[3]).tolist(), np.asarray(last[4]).tolist()],
        "seconds": seconds,
        "selected": [
            selected[0],
            selected[1],
            list(selected[2]),
            np.asarray(selected[3]).tolist(),
            np.asarray(selected[4]).tolist(),
        ],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_epoch(metrics_csv: Path, rows: list[dict[str, Any]]) -> None:
    with open(metrics_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _check_finite(terms: dict[str, torch.Tensor], name: str, epoch: int, step: int) -> None:
    if bool(torch.isfinite(terms["total"].detach())):
        return
    bad = {
        k: float(v.detach())
        for k, v in terms.items()
        if k != "total" and not bool(torch.isfinite(v.detach()))
    }
    named = ", ".join(f"'{k}' = {v}" for k, v in bad.items()) or f"'total' = {float(terms['total'].detach())}"
    raise TrainingError(
        f"{name}: the loss became non-finite at epoch {epoch}, step {step} ({named}). The run stopped and nothing "
        "of it was published (a previous run in the same folder is kept). Check the store with `teachcache "
        "verify STORE` (a cached map may hold NaN/Inf), lower training.lr, or set training.amp: false"
    )


def run_seed(experiment_seed: int, training_seed: int) -> int:
    """The seed of one training run, from the experiment's ``seed`` and the run's ``training.seed`` together.

    Either one changes the network's initialisation and the patches drawn.
    """
    return int(np.random.SeedSequence([experiment_seed, training_seed]).generate_state(1)[0] % 2**31)


def resolve_num_workers(setting: int | str, device: torch.device) -> int:
    """``training.num_workers``: a number, or ``"auto"`` — 0 on CPU (the workers would take the cores the model
    trains on), and on CUDA half the CPU cores, at most 8, so patches are read while the GPU trains."""
    if setting != "auto":
        return int(setting)
    return min(8, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0


def _gflops(
    arch: str, inference: InferenceConfig, in_channels: int, num_classes: int, args: dict[str, Any]
) -> float | None:
    """Forward GFLOPs of one sliding window (cubic windows; ``None`` for others or when counting fails)."""
    from core.models.profile import profile_model

    size = inference.roi_size
    if len(set(size)) != 1:
        return None
    try:
        return round(profile_model(arch, size[0], in_channels, num_classes, args).gflops, 3)
    except Exception:  # a count is a nicety; never fail a finished run over it
        return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate(
    model: nn.Module,
    store: TeacherStore,
    case_ids: list[str],
    inference: InferenceConfig,
    num_classes: int,
    device: torch.device,
    amp: bool = True,
    original: bool = False,
    timings: list[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Dice and HD95 (mm) per foreground class of each case, predicted with sliding windows over the whole volume.

    On the store's preprocessed grid, at its spacing; with ``original``, in the case's original geometry: the
    prediction resampled back onto the original grid (:mod:`core.evaluation.geometry`) and scored against the original label
    file, at the original spacing, as nnU-Net evaluates. :func:`core.evaluation.metrics.hd95_per_class` says what empty masks
    score.

    Args:
        timings: when given, each case's prediction time in seconds (sliding windows over the whole volume) is
            appended to it.

    Returns:
        ``(dice, hd95)``, each (N_cases, K-1).
    """
    from core.evaluation.geometry import original_label, original_spacing, to_original_geometry

    dice, hd95 = [], []
    for case_id in case_ids:
        image = store.read_image(case_id)
        started = time.perf_counter()
        logits = predict_volume(model, image, inference, device, amp=amp)["logits"]
        if timings is not None:
            timings.append(time.perf_counter() - started)
        attrs = store.case_attrs(case_id)
        prediction, label, spacing = logits.argmax(0), store.read_label(case_id), attrs["spacing"]
        if original:
            reference = original_label(store, case_id)
            if reference is None:
                raise TrainingError(
                    f"case '{case_id}': its original label file {attrs['source_files'][-1]} is not at hand to score "
                    "in the original geometry"
                )
            prediction = to_original_geometry(
                prediction, attrs["affine"], attrs["original_affine"], attrs["original_shape"]
            )
            label, spacing = reference, original_spacing(attrs["original_affine"])
        dice.append(dice_per_class(prediction, label, num_classes))
        hd95.append(hd95_per_class(prediction, label, num_classes, spacing))
    model.train()
    return np.asarray(dice, dtype=np.float64), np.asarray(hd95, dtype=np.float64)


def _plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    for key in rows[0]:
        if key.startswith("loss_"):
            ax_loss.plot(epochs, [r[key] for r in rows], label=key.removeprefix("loss_"))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    val = [(r["epoch"], r["val_mean_dice"]) for r in rows if r.get("val_mean_dice") not in ("", None)]
    if val:
        ax_dice.plot(*zip(*val, strict=True), marker="o")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation mean Dice")
    ax_dice.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True, eq=False)
class TrainingRun:
    """One training run: what to train, on which patches and cases, with which loss, and where its files go.

    Attributes:
        name: run name shown in the progress bar and summary.
        model: the network (moved to ``device`` when trained).
        spec: its registry entry (taps, name).
        args: its constructor arguments, recorded in the checkpoints.
        in_channels: input modalities, recorded in the checkpoints.
        num_classes: K including background.
        dataset: training patches.
        store: the store holding the validation cases.
        val_cases: validation case ids.
        cfg: loop settings.
        inference: sliding-window settings for validation.
        loss_fn: ``loss_fn(logits, label, taps, targets) -> {"total": ..., term: ...}``.
        out_dir: the run's folder: metrics, curves, summary, checkpoints.
        checkpoint_path: where a copy of the headline checkpoint goes (a teacher's configured ``checkpoint``,
            inside ``out_dir`` or elsewhere); ``None``: only the run folder's own checkpoints.
        device: training device.
        target_source: turns a batch into distillation targets; ``None`` when not distilling.
        capture_taps: record the model's coarse and fine features for the loss.
        meta: extra fields recorded in the checkpoints and summary (fold, training cases, …).
        recorded: fields recorded in the checkpoints and summary beside ``meta`` that describe the run without
            being part of its key (what they hold is already in it, e.g. the inputs the model expects, which
            ``teachcache predict`` reads back), so recording more never makes a finished run look like another.
        holdout_cases: training cases held out of ``dataset`` to choose the headline checkpoint and stop early
            (``training.holdout``); empty: the final model is the headline.
        skip_done: when the run folder already holds a finished run with the same key (same settings, cases,
            seed, loss), return its result instead of training again (``make cv`` re-run).
        original_geometry: score the headline model once more at the end in each validation case's original
            geometry (needs the raw label files, unchanged since preprocessing); its per-case scores are then the
            run's headline. In-training validation stays on the preprocessed grid.
    """

    name: str
    model: nn.Module
    spec: ModelSpec
    args: dict[str, Any]
    in_channels: int
    num_classes: int
    dataset: PatchDataset
    store: TeacherStore
    val_cases: list[str]
    cfg: TrainingConfig
    inference: InferenceConfig
    loss_fn: LossFn
    out_dir: Path
    checkpoint_path: Path | None
    device: torch.device
    target_source: TargetSource | None = None
    capture_taps: bool = False
    meta: dict[str, Any] | None = None
    recorded: dict[str, Any] | None = None
    holdout_cases: list[str] = field(default_factory=list)
    skip_done: bool = False
    original_geometry: bool = False


def fit(run: TrainingRun, progress: bool = True) -> FitResult:
    """Train ``run.model``: write everything into a staging folder, resume a killed run of the same key, and swap
    the finished folder in whole.

    Raises:
        TrainingError: a loss term became NaN or infinite (the message names it), or the run folder cannot be
            written; nothing is published.
    """
    out_dir, meta = run.out_dir, {**(run.meta or {}), **(run.recorded or {})}
    exported = run.checkpoint_path
    inside = exported is not None and exported.resolve().is_relative_to(out_dir.resolve())
    # a copy of the headline checkpoint inside the run folder is made in the staging folder; one configured outside
    # it (a teacher's `checkpoint` path) only once the run has been published
    relative = exported.resolve().relative_to(out_dir.resolve()) if inside and exported is not None else None
    if relative is not None and str(relative) in _OWN_CHECKPOINTS:
        raise TrainingError(
            f"{run.name}: {exported} would overwrite the run folder's own {relative}; name the checkpoint to cache "
            "something else (e.g. teacher.pth)"
        )
    staging = _staging_dir(out_dir)
    key = _run_key(run)
    if run.skip_done:
        done = _finished_run(out_dir, key, exported)
        if done is not None:
            return done
    ctx = Distributed.from_env()
    if ctx.active:
        run = replace(run, device=distributed.setup(ctx, run.device))
    if not ctx.main:  # process 0 prepares, writes and publishes the run folder; the others train beside it
        distributed.barrier(ctx)
        result = _train(run, staging, False, _resumable_state(staging, key), key, ctx)
        distributed.barrier(ctx)
        return result
    try:
        recover_run_dir(out_dir, keep_staging=True)
        resume = _resumable_state(staging, key)
        if resume is None:
            _warn_if_discarding(staging, run, key)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
    except OSError as exc:
        raise _write_error(out_dir, exc) from None
    distributed.barrier(ctx)  # the staging folder (and the state to resume from) is ready for every process
    try:
        result = _train(run, staging, progress, resume, key, ctx)
        headline = result.checkpoint  # its file name in the run folder
        if relative is not None:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staging / headline, staging / relative)
        result = FitResult(
            **{
                **asdict(result),
                "checkpoint": str(exported if exported is not None else out_dir / result.checkpoint),
                "metrics_csv": str(out_dir / "metrics.csv"),
                "checkpoint_final": str(out_dir / _FINAL),
                "per_case_csv": str(out_dir / "validation_per_case.csv"),
            }
        )
        (staging / _LATEST).unlink(missing_ok=True)  # the optimizer state is for resuming only
        summary = {**asdict(result), **(meta or {}), "run_key": key}
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _write_error(out_dir, exc) from None
    except (KeyboardInterrupt, SystemExit):
        raise  # interrupted: the staging folder and its checkpoint_latest.pth stay, so re-running resumes
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _publish_run_dir(staging, out_dir)
        if exported is not None and relative is None:  # copy the headline to its configured place, atomically
            exported.parent.mkdir(parents=True, exist_ok=True)
            tmp = exported.with_name(f".{exported.name}.tmp")
            shutil.copyfile(out_dir / headline, tmp)
            os.replace(tmp, exported)
    except OSError as exc:
        raise _write_error(out_dir, exc) from None
    distributed.barrier(ctx)
    return result


@dataclass
class Optimisation:
    """What one training step updates: Adam over the model and the loss's own parameters, its schedule and scaler.

    Terms with learnable parts (MSKD's student-side projections) train with the model (``extra``); only the model is
    saved. The gradient scaler is on for fp16 autocast on CUDA (no bf16), off otherwise.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    extra: list[nn.Parameter]

    @classmethod
    def build(
        cls, model: nn.Module, loss_fn: LossFn, cfg: TrainingConfig, device: torch.device
    ) -> Optimisation:
        extra = list(loss_fn.to(device).parameters()) if isinstance(loss_fn, nn.Module) else []
        optimizer = torch.optim.Adam([*model.parameters(), *extra], lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.epochs, power=0.9)
        use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
        return cls(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=use_scaler), extra)


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: LossFn,
    opt: Optimisation,
    device: torch.device,
    amp: bool,
    target_source: TargetSource | None = None,
    recorder: TapRecorder | None = None,
    ctx: Distributed | None = None,
    where: tuple[str, int, int] = ("run", 0, 0),
) -> dict[str, torch.Tensor]:
    """One optimisation step on a collated batch: targets from the source, forward (taps recorded), loss, update.

    The training loop's own step (``make bench`` times exactly this). ``where`` is (run name, epoch, step) for the
    error raised on a non-finite loss term.
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    targets = target_source(batch) if target_source is not None else None
    opt.optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        if recorder is not None:
            with recorder:
                logits = model(image)
            taps = dict(recorder.features)
        else:
            logits, taps = model(image), None
        terms = loss_fn(logits, label, taps, targets)
    _check_finite(terms, *where)
    opt.scaler.scale(terms["total"]).backward()
    distributed.average_gradients(opt.extra, ctx or Distributed())  # DDP averages the model's own
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    return terms


def _train(
    run: TrainingRun,
    out_dir: Path,
    progress: bool,
    resume: dict[str, Any] | None = None,
    run_key: str = "",
    ctx: Distributed | None = None,
) -> FitResult:
    """The loop itself, writing into ``out_dir`` (the staging folder); see :func:`fit`.

    Under ``torchrun`` (``ctx.active``) every process trains a DDP replica on its own patches (the global batch is
    ``batch_size × world``); process 0 alone validates and writes files, and tells the others when to stop.
    """
    ctx = ctx or Distributed()
    main = ctx.main
    run_fields = _run_fields(run)
    name, model, spec, args = run.name, run.model, run.spec, run.args
    in_channels, num_classes, dataset, store = run.in_channels, run.num_classes, run.dataset, run.store
    val_cases, cfg, inference, loss_fn = run.val_cases, run.cfg, run.inference, run.loss_fn
    device, target_source, capture_taps = run.device, run.target_source, run.capture_taps
    meta = {**(run.meta or {}), **(run.recorded or {})}
    model.to(device)
    train_model: nn.Module = model
    if ctx.active:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = Optimisation.build(model, loss_fn, cfg, device)
    optimizer, scheduler, scaler = opt.optimizer, opt.scheduler, opt.scaler
    class_names = (meta or {}).get("class_names") or [f"class_{i}" for i in range(num_classes)]
    fg_names = list(class_names[1:])

    rows: list[dict[str, Any]] = []
    best = (-1.0, [], 0)
    empty = np.empty((0, len(fg_names)))
    last: tuple[float, list[float], int, np.ndarray, np.ndarray] = (float("nan"), [], -1, empty, empty)
    # the epoch chosen on the held-out cases: (held-out Dice, epoch, its validation Dice per class, per case, HD95)
    selected: tuple[float, int, list[float], np.ndarray, np.ndarray] = (-1.0, -1, [], empty, empty)
    holdout = list(run.holdout_cases)
    stale = 0  # epochs since the held-out Dice last improved
    latency = float("nan")  # seconds to predict one validation volume (the last validation's mean)
    started = time.perf_counter()
    metrics_csv = out_dir / "metrics.csv"
    recorder = TapRecorder(model, spec.taps) if capture_taps else None
    total_steps = cfg.epochs * cfg.iterations_per_epoch
    first_epoch, seconds_before = 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        if isinstance(loss_fn, nn.Module):
            loss_fn.load_state_dict(resume["loss"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"])
        if resume.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        rows, stale, seconds_before = list(resume["rows"]), int(resume["stale"]), float(resume["seconds"])
        best = (float(resume["best"][0]), list(resume["best"][1]), int(resume["best"][2]))
        d, per_class, ep, dice, hd = resume["last"]
        last = (
            float(d),
            list(per_class),
            int(ep),
            np.asarray(dice).reshape(-1, len(fg_names)),
            np.asarray(hd).reshape(-1, len(fg_names)),
        )
        h, ep, per_class, dice, hd = resume["selected"]
        selected = (
            float(h),
            int(ep),
            list(per_class),
            np.asarray(dice).reshape(-1, len(fg_names)),
            np.asarray(hd).reshape(-1, len(fg_names)),
        )
        first_epoch = int(resume["epoch"]) + 1
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    steps_done = first_epoch * cfg.iterations_per_epoch
    workers = resolve_num_workers(cfg.num_workers, device)
    sampler = EpochSampler(len(dataset), ctx.rank, ctx.world)
    # one loader for the whole run: its worker processes (each with the store open) persist across epochs
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        multiprocessing_context="spawn" if workers > 0 else None,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    with ProgressBar(f"training {name}", total_steps, enabled=progress and main) as bar:
        bar.advance(steps_done)
        for epoch in range(first_epoch, cfg.epochs):
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            model.train()
            sums: dict[str, float] = {}
            epoch_start = time.perf_counter()
            steps = 0
            for batch in loader:
                terms = train_step(
                    train_model,
                    batch,
                    loss_fn,
                    opt,
                    device,
                    cfg.amp,
                    target_source,
                    recorder,
                    ctx,
                    (name, epoch, steps),
                )
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                steps += 1
                steps_done += 1
                if kill_at and steps_done == kill_at:  # the resume test's kill, mid-epoch
                    os.kill(os.getpid(), signal.SIGKILL)
                bar.advance(
                    status=f"loss {float(terms['total'].detach()):.3f} best Dice {max(best[0], 0):.3f}"
                )
            scheduler.step()
            row: dict[str, Any] = {
                "epoch": epoch,
                "seconds": round(time.perf_counter() - epoch_start, 3),
                "lr": optimizer.param_groups[0]["lr"],
                **{f"loss_{k}": v / max(steps, 1) for k, v in sums.items()},
            }
            validate = (epoch + 1) % cfg.val_every == 0 or epoch == cfg.epochs - 1
            if validate and main:
                timings: list[float] = []
                scores, hd95 = evaluate(
                    model, store, val_cases, inference, num_classes, device, cfg.amp, timings=timings
                )
                latency = float(np.mean(timings)) if timings else latency
                per_class = scores.mean(axis=0).tolist()
                mean_dice = float(np.mean(per_class))
                row.update({f"val_dice_{n}": d for n, d in zip(fg_names, per_class, strict=True)})
                row["val_mean_dice"] = mean_dice
                row["val_mean_hd95"] = float(hd95.mean())
                last = (mean_dice, per_class, epoch, scores, hd95)
                if mean_dice > best[0]:
                    best = (mean_dice, per_class, epoch)
                    save_checkpoint(
                        out_dir / _BEST,
                        model,
                        spec.name,
                        in_channels,
                        num_classes,
                        args,
                        {
                            **(meta or {}),
                            "epoch": epoch,
                            "val_mean_dice": mean_dice,
                            "val_dice": per_class,
                            "selection": "best on the validation cases (optimistic)",
                        },
                    )
                if holdout:
                    held, _ = evaluate(model, store, holdout, inference, num_classes, device, cfg.amp)
                    held_dice = float(held.mean(axis=0).mean())
                    row["holdout_mean_dice"] = held_dice
                    if held_dice > selected[0]:
                        selected = (held_dice, epoch, per_class, scores, hd95)
                        save_checkpoint(
                            out_dir / _SELECTED,
                            model,
                            spec.name,
                            in_channels,
                            num_classes,
                            args,
                            {
                                **(meta or {}),
                                "epoch": epoch,
                                "val_mean_dice": mean_dice,
                                "val_dice": per_class,
                                "holdout_mean_dice": held_dice,
                                "holdout_cases": holdout,
                                "selection": "best on the held-out training cases",
                            },
                        )
                    stale = epoch - selected[1]
            else:
                row.update({f"val_dice_{n}": "" for n in fg_names})
                row["val_mean_dice"] = ""
                row["val_mean_hd95"] = ""
                if holdout:
                    row["holdout_mean_dice"] = ""
            rows.append(row)
            stop = (
                bool(holdout)
                and cfg.early_stopping_patience is not None
                and stale >= cfg.early_stopping_patience
            )
            if main:
                _write_epoch(metrics_csv, rows)
                _save_latest(
                    out_dir / _LATEST,
                    run_key,
                    run_fields,
                    epoch,
                    model,
                    loss_fn,
                    optimizer,
                    scheduler,
                    scaler,
                    rows,
                    best,
                    stale,
                    last,
                    seconds_before + time.perf_counter() - started,
                    selected,
                )
            if distributed.broadcast_flag(ctx, stop, device):
                break  # on the held-out cases, never on the validation cases
    identical = distributed.replicas_identical(model, ctx, device) if ctx.active else None
    if not main:
        return FitResult(name, spec.name, count_parameters(model), -1.0, [], -1, len(rows), 0.0, "", "")
    _plot_curves(rows, out_dir / "curves.png", name)
    final_checkpoint = out_dir / _FINAL
    final_holdout = rows[-1].get("holdout_mean_dice") if holdout else None
    save_checkpoint(
        final_checkpoint,
        model,
        spec.name,
        in_channels,
        num_classes,
        args,
        {
            **(meta or {}),
            "epoch": last[2],
            "val_mean_dice": last[0],
            "val_dice": last[1],
            "selection": "final",
            **({"holdout_mean_dice": final_holdout, "holdout_cases": holdout} if holdout else {}),
        },
    )
    # the headline: chosen on the held-out cases when there are some, else the final model
    if holdout:
        _, epoch, per_class, scores, hd95 = selected
        headline = ("holdout", _SELECTED, epoch, float(np.mean(per_class)), per_class, scores, hd95)
    else:
        headline = ("final", _FINAL, last[2], last[0], last[1], last[3], last[4])
    kind, headline_file, headline_epoch, headline_dice, headline_per_class, case_dice, case_hd95 = headline
    evaluated_in = "preprocessed grid"
    if run.original_geometry:  # the headline model, scored as nnU-Net scores: on the original grid and labels
        if holdout:
            model.load_state_dict(load_checkpoint(out_dir / _SELECTED).state_dict)
        case_dice, case_hd95 = evaluate(
            model, store, val_cases, inference, num_classes, device, cfg.amp, original=True
        )
        headline_per_class = case_dice.mean(axis=0).tolist()
        headline_dice = float(np.mean(headline_per_class))
        evaluated_in = "original geometry"
    per_case_csv = out_dir / "validation_per_case.csv"
    with open(per_case_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "case",
                *(f"dice_{n}" for n in fg_names),
                "mean_dice",
                *(f"hd95_mm_{n}" for n in fg_names),
                "mean_hd95_mm",
            ]
        )
        for case_id, one_dice, one_hd in zip(val_cases, case_dice, case_hd95, strict=True):
            writer.writerow(
                [
                    case_id,
                    *(f"{d:.6f}" for d in one_dice),
                    f"{float(np.mean(one_dice)):.6f}",
                    *(f"{h:.4f}" for h in one_hd),
                    f"{float(np.mean(one_hd)):.4f}",
                ]
            )
    result = FitResult(
        name=name,
        arch=spec.name,
        parameters=count_parameters(model),
        best_mean_dice=best[0],
        best_dice_per_class=list(best[1]),
        best_epoch=best[2],
        epochs_run=len(rows),
        seconds=round(seconds_before + time.perf_counter() - started, 2),
        checkpoint=headline_file,
        metrics_csv=str(metrics_csv),
        final_mean_dice=last[0],
        final_dice_per_class=list(last[1]),
        final_epoch=last[2],
        final_hd95_per_class=last[4].mean(axis=0).tolist() if len(last[4]) else [],
        checkpoint_final=str(final_checkpoint),
        per_case_csv=str(per_case_csv),
        headline=kind,
        headline_epoch=headline_epoch,
        headline_mean_dice=headline_dice,
        headline_dice_per_class=list(headline_per_class),
        headline_hd95_per_class=case_hd95.mean(axis=0).tolist() if len(case_hd95) else [],
        holdout_cases=holdout,
        holdout_mean_dice=selected[0] if holdout else None,
        world_size=ctx.world,
        replicas_identical=identical,
        evaluated_in=evaluated_in,
        seconds_per_volume=latency,
        gflops_per_window=_gflops(spec.name, inference, in_channels, num_classes, args),
    )
    return result
