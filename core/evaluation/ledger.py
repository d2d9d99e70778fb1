"""The study's ledger (``output.results_dir``): what a cross-validation or a screening measured, kept apart from
its checkpoints and caches, small enough to commit, so a study spans machines and sessions.

A run folder holds checkpoints of megabytes and the store gigabytes; what the reports read of a finished run is a
few kilobytes: its ``summary.json``, per-case scores and per-epoch ``metrics.csv``. ``make cv`` and ``make screen``
copy those of every finished run into the ledger, mirroring the runs folder (``students/kd-<kind>/[seed_<s>/]fold_<k>/``,
``teachers/<name>/fold_<k>/``), with ``ledger.json`` naming the run's *identity*
(:func:`teachcache.cv.run_identity`): a hash of everything that decides
what the run trains that can be known before its teachers exist — the dataset's manifest hash, the fold's cases (the
store's splits), preprocessing, the store's settings, the teachers' settings (and a pretrained teacher's checkpoint
digest), the student, the training settings and seed, the inference settings, the recipe
(:meth:`~core.config.DistillationConfig.key_fields`) and the targets whose patches every arm draws, the fold and the
target source. Each fold's teacher-ensemble scores (read from the store) are kept beside them
(``teacher_ensemble/fold_<k>.json``).

A fold whose every planned run the ledger holds under the same identity is not trained again — not its teachers,
its cache nor its students: the reports read it from the ledger (a run folder of the same name under ``runs_dir``
wins). Delete a run's folder in the ledger to train it again. The ledger keeps no weights: ``predict`` needs the
run folder itself.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.config import Config
from core.evaluation.scoring import HOLDOUT_CSV, POSTPROCESSED_CSV, VALIDATION_CSV

__all__ = ["IDENTITY_FILE", "RECORDS", "FoldData", "Ledger"]

# what the reports read of a run (metrics.csv: the health check), and the postprocessed scores beside them
RECORDS = ("summary.json", "metrics.csv", VALIDATION_CSV, POSTPROCESSED_CSV, HOLDOUT_CSV)
IDENTITY_FILE = "ledger.json"
ENSEMBLE_DIR = "teacher_ensemble"


@dataclass(frozen=True)
class FoldData:
    """What a fold's runs are trained and scored on, read from the store: the dataset's manifest hash and the fold's
    ``(train, val)`` case ids (the store's own splits, whatever file they came from)."""

    manifest_hash: str
    train: tuple[str, ...]
    val: tuple[str, ...]


@dataclass(frozen=True)
class Ledger:
    """The ledger of one runs folder: ``root`` mirrors ``runs_dir``."""

    root: Path
    runs_dir: Path

    @classmethod
    def of(cls, cfg: Config) -> Ledger | None:
        """The config's ledger, or ``None`` when ``output.results_dir`` is unset."""
        if cfg.output.results_dir is None:
            return None
        return cls(cfg.output.results_dir, cfg.output.runs_dir)

    def folder(self, run_folder: Path) -> Path:
        """Where the ledger keeps the records of ``run_folder`` (a folder under ``runs_dir``)."""
        return self.root / run_folder.relative_to(self.runs_dir)

    def holds(self, run_folder: Path, identity: str) -> bool:
        """The ledger has the finished run of ``run_folder`` under ``identity``, and ``run_folder`` (which the report
        would read first) holds no other finished run."""
        kept = self.folder(run_folder)
        try:
            recorded = json.loads((kept / IDENTITY_FILE).read_text()).get("identity")
            key = json.loads((kept / "summary.json").read_text()).get("run_key")
        except (OSError, ValueError, AttributeError):
            return False
        if recorded != identity:
            return False
        try:
            here = json.loads((run_folder / "summary.json").read_text()).get("run_key")
        except (OSError, ValueError, AttributeError):
            return True  # no finished run here: the ledger's is the one
        return here == key

    def record(self, run_folder: Path, identity: str | None = None) -> bool:
        """Copy the finished run's records (``summary.json`` and its per-case scores) into the ledger, whole or not at
        all (a staging folder renamed into place). ``identity``: a student run's (:func:`run_identity`); a teacher's
        records are kept for the report without one. Returns whether there was a finished run to record."""
        if not (run_folder / "summary.json").is_file():
            return False
        kept = self.folder(run_folder)
        staging = kept.with_name(f".{kept.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for name in RECORDS:
                if (run_folder / name).is_file():
                    shutil.copyfile(run_folder / name, staging / name)
            if identity is not None:
                (staging / IDENTITY_FILE).write_text(json.dumps({"identity": identity}, indent=2) + "\n")
            if kept.exists():
                shutil.rmtree(kept)
            os.replace(staging, kept)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True

    def record_ensemble(self, fold: int, cases: str, scores: dict[str, tuple[float, float]]) -> None:
        """Keep a fold's teacher-ensemble scores on ``cases`` (``"validation"`` or ``"holdout"``):
        ``{"<fold>/<case>": (Dice, HD95)}``."""
        path = self.root / ENSEMBLE_DIR / f"fold_{fold}.json"
        if not scores:  # none to keep now: an older fold's scores must not stand for this one's
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"cases": cases, "scores": scores}, indent=2) + "\n")
        os.replace(tmp, path)

    def ensemble(self, fold: int, cases: str) -> dict[str, tuple[float, float]]:
        """A fold's teacher-ensemble scores kept on ``cases``; empty when none are."""
        try:
            kept = json.loads((self.root / ENSEMBLE_DIR / f"fold_{fold}.json").read_text())
        except (OSError, ValueError):
            return {}
        if kept.get("cases") != cases:
            return {}
        return {k: (float(v[0]), float(v[1])) for k, v in kept.get("scores", {}).items()}

    def run_folders(self, pattern: str) -> list[tuple[Path, Path]]:
        """The ledger's run folders matching ``pattern`` (as under ``runs_dir``), as the ``runs_dir`` paths they
        mirror, each with its kept folder: ``[(runs_dir path, ledger path)]``."""
        return [(self.runs_dir / p.relative_to(self.root), p) for p in sorted(self.root.glob(pattern))]
