"""The training loop shared by demo teachers (stage 1) and students (stage 2).

It takes its data from a :class:`~core.data.patches.PatchDataset` and, when distilling, its targets from a
*target source*: a callable turning a batch into :data:`~core.terms.DistillationTargets`. Today the source is
the store (cached maps carried in the batch); an online source computing the same targets from teachers in
memory plugs in behind the same callable.

Each epoch: ``iterations_per_epoch`` steps of Adam with a polynomial learning-rate decay (:func:`train_step`), then
(every ``val_every`` epochs, and always after the last) sliding-window validation on whole validation volumes, Dice
per class (:mod:`core.training.validation`). Everything the loop changes lives in one
:class:`~core.training.state.RunState`. Outputs in ``out_dir``: ``metrics.csv`` (one row per epoch),
``curves.png``, ``summary.json``, ``checkpoint_final.pth`` (the final model), ``checkpoint_selected.pth`` (with
held-out cases: the epoch with the best Dice on them), ``validation_per_case.csv`` (the headline model's Dice and
HD95 per validation case and class) and ``checkpoint_best.pth``, the best-on-validation checkpoint (chosen on the
cases it is scored on: labelled as such).

The headline model is chosen without looking at the validation cases: the final model (as nnU-Net reports), or,
when ``training.holdout`` carves cases out of the training cases, the epoch with the best Dice on those; early
stopping (``early_stopping_patience`` epochs without a better held-out Dice) uses the same signal.

A run's folder is replaced as a whole or not at all (:mod:`core.training.checkpoints`): a killed or failed re-run
leaves the previous run's checkpoint, metrics and summary together and untouched. A loss term that becomes NaN or
infinite stops the run at once with a :class:`~core.errors.TrainingError` naming the term.

Resume: after every epoch the staging folder gets ``checkpoint_latest.pth`` (model, optimizer, scheduler, scaler
and RNG states, the metrics so far), written atomically. Re-running the same command after a kill continues from
the last complete epoch and ends exactly where an uninterrupted run ends (patches depend only on seed, epoch and
index); a partial run made with other settings (its ``run_key`` differs) is discarded and training starts afresh.
Testing hook: ``TEACHCACHE_TEST_KILL_AT_STEP=N`` SIGKILLs the process after its N-th training step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from core.config import InferenceConfig
from core.data.patches import EpochSampler
from core.errors import TrainingError
from core.evaluation.scoring import HOLDOUT_CSV, POSTPROCESSED_CSV, VALIDATION_CSV
from core.inference import autocast
from core.losses.distillation import STAT_PREFIX
from core.models.checkpoint import add_checkpoint_meta
from core.models.taps import TapRecorder
from core.progress import ProgressBar
from core.training import distributed
from core.training.checkpoints import (
    FINAL_CHECKPOINT,
    LATEST_CHECKPOINT,
    OWN_CHECKPOINTS,
    finished_run,
    publish_run_dir,
    recover_run_dir,
    resumable_state,
    save_latest,
    save_model,
    staging_dir,
    warn_if_discarding,
    write_error,
)
from core.training.distributed import Distributed
from core.training.health import KDHealthWarning, TermHealth
from core.training.metrics_log import plot_curves, write_metrics_csv
from core.training.run import (
    FitResult,
    LossFn,
    TargetSource,
    TrainingRun,
    count_parameters,
    resolve_num_workers,
    run_fields,
    run_key,
)
from core.training.state import Optimisation, RunState
from core.training.validation import (
    Headline,
    choose_headline,
    choose_postprocessing,
    final_holdout_scores,
    score_postprocessed,
    skip_validation,
    validate_epoch,
    write_per_case_csv,
)

__all__ = ["KILL_AT_STEP_ENV", "fit", "train_step"]

KILL_AT_STEP_ENV = "TEACHCACHE_TEST_KILL_AT_STEP"


def _check_finite(terms: dict[str, torch.Tensor], name: str, epoch: int, step: int) -> None:
    """Raise a :class:`TrainingError` naming the loss terms that are NaN or infinite, if any."""
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
    health: TermHealth | None = None,
    step: int = 0,
) -> dict[str, torch.Tensor]:
    """One optimisation step on a collated batch: targets from the source, forward (taps recorded), loss, update.

    The training loop's own step (``make bench`` times exactly this). ``batch["image"]`` is (B, C, D, H, W),
    ``batch["label"]`` (B, D, H, W). ``where`` is (run name, epoch, step) for the error raised on a non-finite loss
    term. ``health`` sets the KD terms' weights for ``step`` (the run's step, 0-based) and, on its measured steps,
    measures their gradients beside the step's own backward pass.

    Returns:
        The loss terms of the step, ``"total"`` among them (scalars, still attached to the graph).
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    targets = target_source(batch) if target_source is not None else None
    opt.optimizer.zero_grad(set_to_none=True)
    if health is not None:
        health.before_step(step)
    with autocast(device, amp):
        if recorder is not None:
            with recorder:
                logits = model(image)
            taps = dict(recorder.features)
        else:
            logits, taps = model(image), None
        terms = loss_fn(logits, label, taps, targets)
    _check_finite(terms, *where)
    if health is not None and health.measures(step):
        health.measure(terms, opt.scaler.scale if opt.scaler.is_enabled() else None)
    opt.scaler.scale(terms["total"]).backward()
    distributed.average_gradients(opt.extra, ctx or Distributed())  # DDP averages the model's own
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    return terms


def fit(run: TrainingRun, progress: bool = True) -> FitResult:
    """Train ``run.model``: write everything into a staging folder, resume a killed run of the same key, and swap
    the finished folder in whole.

    Raises:
        TrainingError: a loss term became NaN or infinite (the message names it), or the run folder cannot be
            written; nothing is published.
    """
    relative = _headline_copy_in_run_dir(run)
    staging, key = staging_dir(run.out_dir), run_key(run)
    if run.skip_done:
        done = finished_run(run.out_dir, key, run.checkpoint_path)
        if done is not None:
            return done
    ctx = Distributed.from_env()
    if ctx.active:
        run = replace(run, device=distributed.setup(ctx, run.device))
    if not ctx.main:  # process 0 prepares, writes and publishes the run folder; the others train beside it
        distributed.barrier(ctx)
        result = _train(run, staging, False, resumable_state(staging, key), key, ctx)
        distributed.barrier(ctx)
        return result
    resume = _prepare_staging(run, staging, key)
    distributed.barrier(ctx)  # the staging folder (and the state to resume from) is ready for every process
    try:
        trained = _train(run, staging, progress, resume, key, ctx)
        result = _write_summary(run, staging, trained, relative, key)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(run.out_dir, exc) from None
    except (KeyboardInterrupt, SystemExit):
        raise  # interrupted: the staging folder and its checkpoint_latest.pth stay, so re-running resumes
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(run, staging, trained.checkpoint, relative)
    distributed.barrier(ctx)
    return result


def _headline_copy_in_run_dir(run: TrainingRun) -> Path | None:
    """Where the copy of the headline checkpoint goes inside the run folder (relative to it); ``None`` when there
    is no copy or it goes elsewhere.

    A copy inside the run folder is made in the staging folder; one configured outside it (a teacher's
    ``checkpoint`` path) only once the run has been published.
    """
    exported, out_dir = run.checkpoint_path, run.out_dir
    if exported is None or not exported.resolve().is_relative_to(out_dir.resolve()):
        return None
    relative = exported.resolve().relative_to(out_dir.resolve())
    if str(relative) in OWN_CHECKPOINTS:
        raise TrainingError(
            f"{run.name}: {exported} would overwrite the run folder's own {relative}; name the checkpoint to cache "
            "something else (e.g. teacher.pth)"
        )
    return relative


def _prepare_staging(run: TrainingRun, staging: Path, key: str) -> dict[str, Any] | None:
    """Mend the run folder, and return the state of a killed run of the same key to resume from, or start an
    empty staging folder (saying so when a killed run of other settings is discarded)."""
    try:
        recover_run_dir(run.out_dir, keep_staging=True)
        resume = resumable_state(staging, key)
        if resume is None:
            warn_if_discarding(staging, run, key)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
    except OSError as exc:
        raise write_error(run.out_dir, exc) from None
    return resume


def _write_summary(
    run: TrainingRun, staging: Path, trained: FitResult, relative: Path | None, key: str
) -> FitResult:
    """The result with its paths as published, written as ``summary.json`` into the staging folder beside the
    headline copy (when it goes inside the run folder); the resume state is dropped."""
    out_dir, exported = run.out_dir, run.checkpoint_path
    if relative is not None:
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staging / trained.checkpoint, staging / relative)
    result = FitResult(
        **{
            **asdict(trained),
            "checkpoint": str(exported if exported is not None else out_dir / trained.checkpoint),
            "metrics_csv": str(out_dir / "metrics.csv"),
            "checkpoint_final": str(out_dir / FINAL_CHECKPOINT),
            "per_case_csv": str(out_dir / VALIDATION_CSV),
        }
    )
    (staging / LATEST_CHECKPOINT).unlink(missing_ok=True)  # the optimizer state is for resuming only
    # run_fields: what the key hashes, so the cross-validation report can say what differs between pooled runs
    summary = {**asdict(result), **run.recorded_fields, "run_key": key, "run_fields": run_fields(run)}
    (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _publish(run: TrainingRun, staging: Path, headline: str, relative: Path | None) -> None:
    """Swap the staging folder in, then copy the headline checkpoint (file ``headline``) to its configured place
    outside the run folder, atomically."""
    exported = run.checkpoint_path
    try:
        publish_run_dir(staging, run.out_dir)
        if exported is not None and relative is None:
            exported.parent.mkdir(parents=True, exist_ok=True)
            tmp = exported.with_name(f".{exported.name}.tmp")
            shutil.copyfile(run.out_dir / headline, tmp)
            os.replace(tmp, exported)
    except OSError as exc:
        raise write_error(run.out_dir, exc) from None


@dataclass
class _Stepper:
    """How this process takes its training steps.

    Attributes:
        module: what the steps train: the model, or its DDP replica under ``torchrun``.
        loader: one loader for the whole run (its worker processes, each with the store open, persist across
            epochs), over ``sampler``'s indices.
        sampler: this process's patch indices of each epoch.
        recorder: records the coarse and fine taps for the loss; ``None`` when the loss needs none.
        ctx: this process's place in a data-parallel run.
        kill_at: the training step after which the process SIGKILLs itself (``TEACHCACHE_TEST_KILL_AT_STEP``);
            0: never.
        health: the KD terms' weights and gradient health check (:mod:`core.training.health`); ``None`` without KD
            terms. Under ``torchrun`` the warm-up ramp applies but nothing is measured (DDP reduces gradients in its
            own backward hooks, which a second measurement pass would disturb), so the balance is refused there.
    """

    module: nn.Module
    loader: DataLoader
    sampler: EpochSampler
    recorder: TapRecorder | None
    ctx: Distributed
    kill_at: int
    health: TermHealth | None = None


def _start(
    run: TrainingRun, resume: dict[str, Any] | None, key: str, ctx: Distributed
) -> tuple[RunState, _Stepper]:
    """The run's state before its first epoch to train — fresh, or restored from ``resume`` — and its stepper."""
    run.model.to(run.device)
    module: nn.Module = run.model
    if ctx.active:
        module = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    opt = Optimisation.build(run.model, run.loss_fn, run.cfg, run.device)
    state = RunState(
        run.model,
        run.loss_fn,
        opt,
        len(run.foreground_names),
        key,
        run_fields(run),
        teacher_clock=run.teacher_clock,
    )
    if resume is not None:
        state.restore(resume)
    state.steps_done = state.epochs_done * run.cfg.iterations_per_epoch
    # a dataset that runs teachers (context mode) stays in this process, where they are
    workers = 0 if run.dataset.context is not None else resolve_num_workers(run.cfg.num_workers, run.device)
    sampler = EpochSampler(len(run.dataset), ctx.rank, ctx.world)
    loader = DataLoader(
        run.dataset,
        batch_size=run.cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        multiprocessing_context="spawn" if workers > 0 else None,
        persistent_workers=workers > 0,
        pin_memory=run.device.type == "cuda",
    )
    recorder = TapRecorder(run.model, run.spec.taps) if run.capture_taps else None
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    health = TermHealth.of(run.loss_fn, run.model, run.cfg.iterations_per_epoch, measure=not ctx.active)
    if ctx.active and health is not None and health.cfg.grad_fraction is not None:
        raise TrainingError(
            f"{run.name}: distillation.balance.grad_fraction measures each term's gradient beside the step's own "
            "backward pass, which DDP's gradient reduction does not allow under torchrun; train on one process "
            "(make distil without GPUS=), or use warmup_epochs alone"
        )
    return state, _Stepper(module, loader, sampler, recorder, ctx, kill_at, health)


def _train(
    run: TrainingRun,
    staging: Path,
    progress: bool,
    resume: dict[str, Any] | None = None,
    key: str = "",
    ctx: Distributed | None = None,
) -> FitResult:
    """The loop itself, writing into ``staging``; see :func:`fit`. Its result names files by their staging paths.

    Under ``torchrun`` (``ctx.active``) every process trains a DDP replica on its own patches (the global batch is
    ``batch_size × world``); process 0 alone validates and writes files, and tells the others when to stop.
    """
    ctx = ctx or Distributed()
    state, stepper = _start(run, resume, key, ctx)
    total_steps = run.cfg.epochs * run.cfg.iterations_per_epoch
    with ProgressBar(f"training {run.name}", total_steps, enabled=progress and ctx.main) as bar:
        bar.advance(state.steps_done)
        for epoch in range(state.epochs_done, run.cfg.epochs):
            row = _train_epoch(run, state, stepper, epoch, bar)
            if ctx.main and ((epoch + 1) % run.cfg.val_every == 0 or epoch == run.cfg.epochs - 1):
                validate_epoch(run, state, epoch, row, staging)
            else:
                skip_validation(run, row)
            state.rows.append(row)
            state.epochs_done = epoch + 1
            if ctx.main:
                write_metrics_csv(staging / "metrics.csv", state.rows)
                save_latest(staging, state)
            if distributed.broadcast_flag(ctx, _stops_early(run, state), run.device):
                break  # on the held-out cases, never on the validation cases
    identical = distributed.replicas_identical(run.model, ctx, run.device) if ctx.active else None
    if not ctx.main:
        return FitResult(
            run.name, run.spec.name, count_parameters(run.model), -1.0, [], -1, len(state.rows), 0.0, "", ""
        )
    return _finish(run, state, staging, ctx.world, identical, stepper.health)


def _train_epoch(
    run: TrainingRun, state: RunState, stepper: _Stepper, epoch: int, bar: ProgressBar
) -> dict[str, Any]:
    """One epoch of training steps, then the learning-rate step.

    Returns:
        The epoch's ``metrics.csv`` row so far: epoch, seconds, learning rate and the mean of each loss term.
    """
    run.dataset.set_epoch(epoch)
    stepper.sampler.set_epoch(epoch)
    run.model.train()
    sums: dict[str, float] = {}
    epoch_start = time.perf_counter()
    steps = 0
    for batch in stepper.loader:
        terms = train_step(
            stepper.module,
            batch,
            run.loss_fn,
            state.opt,
            run.device,
            run.cfg.amp,
            run.target_source,
            stepper.recorder,
            stepper.ctx,
            (run.name, epoch, steps),
            stepper.health,
            state.steps_done,
        )
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        steps += 1
        state.steps_done += 1
        if stepper.kill_at and state.steps_done == stepper.kill_at:  # the resume test's kill, mid-epoch
            os.kill(os.getpid(), signal.SIGKILL)
        bar.advance(
            status=f"loss {float(terms['total'].detach()):.3f} best Dice {max(state.best.mean_dice, 0):.3f}"
        )
    state.opt.scheduler.step()
    return {
        "epoch": epoch,
        "seconds": round(time.perf_counter() - epoch_start, 3),
        "lr": state.opt.optimizer.param_groups[0]["lr"],
        **{k if k.startswith(STAT_PREFIX) else f"loss_{k}": v / max(steps, 1) for k, v in sums.items()},
        **(stepper.health.epoch_columns() if stepper.health is not None else {}),
    }


def _stops_early(run: TrainingRun, state: RunState) -> bool:
    """Whether ``early_stopping_patience`` epochs have passed without a better held-out Dice."""
    patience = run.cfg.early_stopping_patience
    return bool(run.holdout_cases) and patience is not None and state.stale >= patience


def _finish(
    run: TrainingRun,
    state: RunState,
    staging: Path,
    world: int,
    identical: bool | None,
    health: TermHealth | None = None,
) -> FitResult:
    """After the last epoch (process 0): the curves, the final checkpoint, the headline and its per-case scores, and
    the KD terms' health (each warning said once)."""
    plot_curves(state.rows, staging / "curves.png", run.name)
    verdict = health.verdict(state.rows) if health is not None else {}
    for message in verdict.get("warnings", []):
        warnings.warn(KDHealthWarning(f"{run.name}: {message}"), stacklevel=2)
    holdout = list(run.holdout_cases)
    final_holdout = state.rows[-1].get("holdout_mean_dice")
    save_model(
        run,
        staging / FINAL_CHECKPOINT,
        state.last,
        {
            "selection": "final",
            **({"holdout_mean_dice": final_holdout, "holdout_cases": holdout} if holdout else {}),
        },
    )
    final_holdout = final_holdout_scores(run, state)
    if final_holdout is not None:  # the final model on the held-out cases: what a screening compares
        write_per_case_csv(staging / HOLDOUT_CSV, run, final_holdout, list(run.holdout_cases))
    headline = choose_headline(run, state, staging)
    write_per_case_csv(staging / VALIDATION_CSV, run, headline.scores)
    postprocessing = _postprocessing(run, headline, staging)
    result = _result(run, state, headline, staging, world, identical, verdict or None, postprocessing)
    if final_holdout is None:
        return result
    return replace(result, final_holdout_mean_dice=final_holdout.mean_dice)


def _postprocessing(run: TrainingRun, headline: Headline, staging: Path) -> dict[str, Any] | None:
    """With held-out cases: the classes whose largest component to keep (chosen on them), recorded in the headline
    checkpoint for ``teachcache predict``, and the validation scores with them (``validation_per_case_postprocessed.csv``);
    ``None`` without held-out cases."""
    choice = choose_postprocessing(run)
    if choice is None:
        return None
    add_checkpoint_meta(staging / headline.checkpoint, {"postprocessing": choice})
    classes = choice["largest_component_classes"]
    scores = score_postprocessed(run, headline, classes) if classes else headline.scores
    write_per_case_csv(staging / POSTPROCESSED_CSV, run, scores)
    return {
        **choice,
        "headline_mean_dice": scores.mean_dice,
        "headline_dice_per_class": list(scores.dice_per_class),
        "per_case_csv": str(run.out_dir / POSTPROCESSED_CSV),
    }


def _result(
    run: TrainingRun,
    state: RunState,
    headline: Headline,
    staging: Path,
    world: int,
    identical: bool | None,
    kd_health: dict[str, Any] | None = None,
    postprocessing: dict[str, Any] | None = None,
) -> FitResult:
    """What the finished run produced, its files named by their staging paths."""
    last, chosen = state.last, headline.scores
    return FitResult(
        name=run.name,
        arch=run.spec.name,
        parameters=count_parameters(run.model),
        best_mean_dice=state.best.mean_dice,
        best_dice_per_class=list(state.best.dice_per_class),
        best_epoch=state.best.epoch,
        epochs_run=len(state.rows),
        seconds=round(state.seconds, 2),
        checkpoint=headline.checkpoint,
        metrics_csv=str(staging / "metrics.csv"),
        final_mean_dice=last.mean_dice,
        final_dice_per_class=list(last.dice_per_class),
        final_epoch=last.epoch,
        final_hd95_per_class=last.case_hd95.mean(axis=0).tolist() if len(last.case_hd95) else [],
        checkpoint_final=str(staging / FINAL_CHECKPOINT),
        per_case_csv=str(staging / VALIDATION_CSV),
        headline=headline.kind,
        headline_epoch=chosen.epoch,
        headline_mean_dice=chosen.mean_dice,
        headline_dice_per_class=list(chosen.dice_per_class),
        headline_hd95_per_class=chosen.case_hd95.mean(axis=0).tolist() if len(chosen.case_hd95) else [],
        holdout_cases=list(run.holdout_cases),
        holdout_mean_dice=state.selected.holdout_mean_dice if run.holdout_cases else None,
        world_size=world,
        replicas_identical=identical,
        evaluated_in=headline.evaluated_in,
        seconds_per_volume=state.latency,
        teacher_forward_seconds=None if state.teacher_seconds is None else round(state.teacher_seconds, 2),
        gflops_per_window=_gflops(run.spec.name, run.inference, run.in_channels, run.num_classes, run.args),
        kd_health=kd_health,
        postprocessing=postprocessing,
    )


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
