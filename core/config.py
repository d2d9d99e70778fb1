"""Experiment configuration: one YAML file per experiment, validated on load.

A file may start from another with ``extends: other.yaml`` (a path relative to the file): mappings are merged
key by key, anything else is replaced — so an ablation states only what it changes.

The schema is a tree of frozen pydantic models that reject unknown keys. :func:`load_config` turns every
validation problem into a single :class:`~core.errors.ConfigError` naming the file and the dotted key, so a typo
never reaches a traceback. Relative paths are resolved against the current working directory (the repository
root when run through ``make``). ``docs/configuration.md`` documents every key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import ConfigError
from core.terms import TERM_SPECS

__all__ = [
    "AttentionConfig",
    "AugmentationConfig",
    "BalanceConfig",
    "Config",
    "DatasetConfig",
    "DistillationConfig",
    "EvaluationConfig",
    "InferenceConfig",
    "ModelConfig",
    "OutputConfig",
    "PreprocessingConfig",
    "PrimaryEndpointConfig",
    "SplitsConfig",
    "StoreConfig",
    "SyntheticConfig",
    "TeacherConfig",
    "TermConfig",
    "TrainingConfig",
    "apply_recipe",
    "load_config",
]

Triple = tuple[int, int, int]
FloatTriple = tuple[float, float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(_Strict):
    """How to generate the embedded synthetic dataset when ``dataset.raw_dir`` does not exist yet."""

    kind: Literal["petct", "mri", "thin", "organ"] = "petct"
    num_cases: int = Field(20, ge=2)
    shape: Triple = (80, 80, 32)
    spacing: FloatTriple = (1.6, 1.6, 4.0)
    seed: int = 0


class DatasetConfig(_Strict):
    """Where the raw dataset lives, and in which layout (docs/datasets.md).

    ``nnunet``: nnU-Net v2 raw (``imagesTr/CASE_0000.nii.gz``, ``labelsTr/``, ``dataset.json``); ``msd``: Medical
    Segmentation Decathlon (``dataset.json`` with a ``training`` list, 4-D images); ``hecktor``: HECKTOR 2021
    (``<PID>_ct.nii.gz``, ``<PID>_pt.nii.gz``, ``<PID>_gtvt.nii.gz``, ``bbox.csv``); ``picai``: PI-CAI 2022
    (``<patient>/<patient>_<study>_{t2w,adc,hbv}.mha``, masks under ``labels_dir``).
    """

    raw_dir: Path
    synthetic: SyntheticConfig | None = None
    layout: Literal["nnunet", "msd", "hecktor", "picai"] = "nnunet"
    labels_dir: Path | None = None  # picai: the picai_labels folder (or its human_expert/resampled folder)
    bbox_file: Path | None = None  # hecktor: default <raw_dir>/bbox.csv


class PreprocessingConfig(_Strict):
    """MONAI preprocessing applied once before anything is cached.

    Its hash (:meth:`Config.preprocessing_hash`) is stored with the cache so a stale store is detected.
    """

    target_spacing: FloatTriple = (2.0, 2.0, 2.0)
    ct_window: tuple[float, float] = (-200.0, 300.0)
    foreground_channel: int = Field(0, ge=0)
    foreground_threshold: float = 0.0
    crop_margin: int = Field(4, ge=0)
    size_divisor: int = Field(32, ge=1)
    min_size: Triple = (32, 32, 32)
    # modalities on other grids are resampled onto this channel's grid (MONAI ResampleToMatch)
    reference_channel: int = Field(0, ge=0)
    # per modality name: "ct" (clip to ct_window, scale to [0, 1]), "zscore", or "none" (e.g. PET kept in SUV);
    # a channel not named here: "ct" if it is called CT, else "zscore" (as nnU-Net)
    normalization: dict[str, Literal["ct", "zscore", "none"]] = Field(default_factory=dict)

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(cls, v: FloatTriple) -> FloatTriple:
        if min(v) <= 0:
            raise ValueError("every spacing must be > 0 mm")
        return v

    @field_validator("ct_window")
    @classmethod
    def _window_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError("ct_window must be [low, high] with low < high (Hounsfield units)")
        return v


class SplitsConfig(_Strict):
    """Patient-level k-fold cross-validation splits (nnU-Net ``splits_final.json`` format)."""

    num_folds: int = Field(5, ge=2)
    seed: int = 12345
    file: Path | None = None


class StoreConfig(_Strict):
    """The teacher store (a Zarr v3 group): a local path or an fsspec URL such as ``file:///data/store.zarr``."""

    path: str
    chunk_size: Triple = (64, 64, 64)
    feature_sketch_channels: int | None = Field(None, ge=1)
    # a finer tap's features are average-pooled to this stride before sketching (the fine tap, stride 2, is 8×
    # smaller at 4); 1 keeps every tap's own grid
    feature_sketch_stride: int = Field(4, ge=1)
    # int8: each sketch channel quantised with its own scale (max |value| / 127); float16: as computed
    feature_sketch_dtype: Literal["int8", "float16"] = "int8"


class ModelConfig(_Strict):
    """A network from the model registry, by name and constructor arguments."""

    arch: str
    args: dict[str, Any] = Field(default_factory=dict)


class AugmentationConfig(_Strict):
    """Training-patch augmentation (MONAI dictionary transforms, ``docs/augmentation.md``).

    Spatial transforms act jointly on the image, the label and every cached teacher map (each on its own grid);
    intensity transforms act on the image only — views the teachers never saw (Beyer et al., 2022).
    """

    flip: bool = True
    rotate90: bool = True
    rotate_degrees: float = Field(0.0, ge=0, le=180)
    scale: float = Field(0.0, ge=0, lt=1)
    spatial_prob: float = Field(0.2, ge=0, le=1)
    noise_std: float = Field(0.0, ge=0)
    gamma: tuple[float, float] | None = None
    shift: float = Field(0.0, ge=0)
    intensity_prob: float = Field(0.15, ge=0, le=1)

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError("gamma must be [low, high] with 0 < low <= high")
        return v


class TrainingConfig(_Strict):
    """The training loop shared by demo teachers and students."""

    epochs: int = Field(10, ge=1)
    iterations_per_epoch: int = Field(25, ge=1)
    batch_size: int = Field(2, ge=1)
    patch_size: Triple = (32, 32, 32)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    foreground_oversampling: float = Field(0.33, ge=0, le=1)
    val_every: int = Field(1, ge=1)
    # the fraction of the fold's training cases held out (not trained on) to choose the checkpoint, stop early and
    # measure a teacher's Dice for teacher_weights: dice; 0: the final model is the headline, nothing is chosen
    holdout: float = Field(0.0, ge=0, lt=0.5)
    # epochs without a better held-out Dice before training stops (the paper's 40); only with holdout > 0
    early_stopping_patience: int | None = Field(40, ge=1)
    focal_gamma: float = Field(2.0, ge=0)

    @field_validator("focal_gamma")
    @classmethod
    def _gamma_derivable(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError(
                "focal_gamma must be 0 (cross-entropy) or >= 1: (1 − p)^γ with 0 < γ < 1 has an infinite "
                "derivative where the softmax saturates, which turns gradients into NaN"
            )
        return v

    num_workers: int | Literal["auto"] = "auto"

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("num_workers must be 'auto' or a number ≥ 0")
        return v

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    seed: int = 0
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)


class InferenceConfig(_Strict):
    """Sliding-window inference (MONAI) used for caching and validation."""

    roi_size: Triple = (32, 32, 32)
    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(4, ge=1)
    mode: Literal["gaussian", "constant"] = "gaussian"


FOLD_PLACEHOLDER = "{fold}"
ALL_FOLDS = "all_folds"


class TapConfig(_Strict):
    """A tap declared by module path, for a teacher whose network TeachCache does not register (a MONAI bundle)."""

    module: str
    capture: Literal["output", "input"] = "output"
    index: int = Field(0, ge=0)


class NnUNetTeacherConfig(_Strict):
    """An nnU-Net v2 trained model folder as a teacher (docs/teachers.md)."""

    results: Path  # nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>
    configuration: str | None = None  # default: the folder name's last part (3d_fullres)
    folds: list[int] | None = None  # None: nnU-Net's fold k serves this project's fold k (splits must agree)
    checkpoint: str = "checkpoint_final.pth"
    mirror: bool = False  # mirroring test-time augmentation (nnU-Net's axes), averaged in probability space
    splits: Path | None = None  # nnU-Net's splits_final.json (default: $nnUNet_preprocessed/<Dataset>/)


class TeacherConfig(ModelConfig):
    """A teacher: a registry architecture and its checkpoint, or a MONAI bundle; optionally its own preprocessing.

    ``bundle``: a MONAI bundle folder (``configs/inference.json`` or ``.yaml``, ``models/model.pt``); its network,
    preprocessing and inferer come from the bundle's config (``monai.bundle``). ``preprocessing``: the teacher's
    own (spacing, normalisation, …) when it was trained with other inputs than the store's; stage 1 prepares each
    case the teacher's way and resamples its outputs onto the store's grid (docs/teachers.md). ``channels``: the
    dataset channels the teacher reads, by name, in its input order (selection and reordering).
    """

    arch: str = ""  # type: ignore[assignment]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    checkpoint: Path = Path()
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    inference: InferenceConfig | None = None
    bundle: Path | None = None
    taps: dict[Literal["coarse", "fine"], TapConfig] | None = None
    preprocessing: PreprocessingConfig | None = None
    channels: list[str] | None = None
    nnunet: NnUNetTeacherConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _bundle_weights(cls, data: Any) -> Any:
        # a bundle keeps its weights in models/model.pt: that file is the teacher's checkpoint (hashed, fold-checked)
        if isinstance(data, dict) and data.get("bundle") is not None and not data.get("checkpoint"):
            data = {**data, "checkpoint": Path(str(data["bundle"])) / "models" / "model.pt"}
        # an nnU-Net folder: fold k's checkpoint ({fold}: one per fold), or the first listed fold's
        nn = data.get("nnunet") if isinstance(data, dict) else None
        if isinstance(nn, dict) and nn.get("results") and not data.get("checkpoint"):
            folds = nn.get("folds")
            slot = f"fold_{FOLD_PLACEHOLDER}" if folds is None else f"fold_{folds[0] if folds else 0}"
            data = {
                **data,
                "checkpoint": Path(str(nn["results"])) / slot / nn.get("checkpoint", "checkpoint_final.pth"),
            }
        return data

    @model_validator(mode="after")
    def _kind(self) -> TeacherConfig:
        if self.nnunet is not None:
            if (
                self.arch
                or self.bundle is not None
                or self.preprocessing is not None
                or self.taps is not None
            ):
                raise ValueError(
                    f"teacher '{self.name}': an nnU-Net teacher brings its network, preprocessing and taps from its "
                    "folder; remove arch, bundle, preprocessing and taps"
                )
            if self.nnunet.folds is not None and not self.nnunet.folds:
                raise ValueError(f"teacher '{self.name}': nnunet.folds lists no fold")
            return self
        if self.bundle is not None:
            if self.arch:
                raise ValueError(
                    f"teacher '{self.name}': give either arch (+ checkpoint) or bundle, not both"
                )
            if self.preprocessing is not None:
                raise ValueError(
                    f"teacher '{self.name}': a bundle brings its own preprocessing (its config's `preprocessing`); "
                    "remove the teacher's preprocessing block"
                )
        elif not self.arch:
            raise ValueError(
                f"teacher '{self.name}' needs arch and checkpoint (a registered network), or bundle"
            )
        elif self.checkpoint == Path():
            raise ValueError(f"teacher '{self.name}' needs a checkpoint")
        if self.taps is not None and self.bundle is None:
            raise ValueError(
                f"teacher '{self.name}': taps are declared for bundle teachers; a registered arch has its own"
            )
        return self

    @property
    def kind(self) -> str:
        """``nnunet``, ``bundle``, ``own_preprocessing`` (a registry network fed its own way) or ``registry``."""
        if self.nnunet is not None:
            return "nnunet"
        if self.bundle is not None:
            return "bundle"
        return (
            "own_preprocessing" if self.preprocessing is not None or self.channels is not None else "registry"
        )

    @field_validator("checkpoint")
    @classmethod
    def _fold_template(cls, v: Path) -> Path:
        rest = str(v).replace(FOLD_PLACEHOLDER, "")
        if "{" in rest or "}" in rest:
            raise ValueError(
                f"the only placeholder a checkpoint path may hold is {FOLD_PLACEHOLDER} (one checkpoint per fold), "
                f"got {v}"
            )
        return v

    # the fold a per-fold teacher was bound to by for_fold (its checkpoint path no longer shows {fold})
    _bound_fold: int | None = PrivateAttr(default=None)

    @property
    def per_fold(self) -> bool:
        """One checkpoint per fold (``checkpoint`` holds ``{fold}``), or one for every fold (trained elsewhere)."""
        return self._bound_fold is not None or FOLD_PLACEHOLDER in str(self.checkpoint)

    def store_key(self, fold: int) -> str:
        """Where fold ``fold``'s copy of this teacher lives in the store: ``<name>/fold_<k>`` for a per-fold teacher,
        ``<name>/all_folds`` for one checkpoint used in every fold (docs/store-format.md)."""
        if self._bound_fold is not None and self._bound_fold != fold:
            raise ValueError(f"teacher '{self.name}' is bound to fold {self._bound_fold}, not {fold}")
        return f"{self.name}/fold_{fold}" if self.per_fold else f"{self.name}/{ALL_FOLDS}"

    def for_fold(self, fold: int) -> TeacherConfig:
        """This teacher with ``{fold}`` in its checkpoint path replaced by ``fold`` (itself when not per fold)."""
        if not self.per_fold or self._bound_fold == fold:
            return self
        if self._bound_fold is not None:
            raise ValueError(f"teacher '{self.name}' is bound to fold {self._bound_fold}, not {fold}")
        bound = self.model_copy(
            update={"checkpoint": Path(str(self.checkpoint).replace(FOLD_PLACEHOLDER, str(fold)))}
        )
        bound._bound_fold = fold
        return bound


class AttentionConfig(_Strict):
    """Attention maps as in attention transfer: ``mean_c |F|^p``, then normalised."""

    p: float = Field(2.0, gt=0)
    norm: Literal["l1", "l2"] = "l2"


class BalanceConfig(_Strict):
    """How the KD terms' weights move during training, and the gradient health check (``docs/losses.md``, "Term
    balancing and the health check")."""

    # the KD weights ramp linearly from 0 to their configured value over the first warmup_epochs (per step)
    warmup_epochs: int = Field(0, ge=0)
    # each KD term's weighted gradient norm on the student's weights held at this fraction of L_SEG's, its weight
    # re-scaled at every measurement; None: the configured weights as they are
    grad_fraction: float | None = Field(None, gt=0)
    # training steps between two gradient measurements (the health check's and the balance's); 0: no health check
    every: int = Field(25, ge=0)

    @model_validator(mode="after")
    def _measured(self) -> BalanceConfig:
        if self.grad_fraction is not None and self.every == 0:
            raise ValueError("grad_fraction re-measures the gradients every `every` steps; set every >= 1")
        return self

    @property
    def changes_training(self) -> bool:
        """Whether the weights move (a ramp or the balance); the health check alone changes no step."""
        return self.warmup_epochs > 0 or self.grad_fraction is not None


class TermConfig(_Strict):
    """One distillation term (``docs/losses.md``): its registered name, weight and options."""

    name: str
    weight: float = Field(1.0, ge=0)
    combine: Literal["average", "sum"] | None = None
    teacher_weights: Literal["uniform", "dice", "class_dice", "confidence"] = "uniform"
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:

        if v not in TERM_SPECS:
            raise ValueError(f"unknown distillation term '{v}'; registered: {', '.join(sorted(TERM_SPECS))}")
        return v


def _teachformer_terms() -> list[TermConfig]:
    return [TermConfig(name="pwd"), TermConfig(name="afs")]


class DistillationConfig(_Strict):
    """The recipe the student is trained with: a name, a temperature, and weighted terms."""

    kind: str = Field("teachformer", pattern=r"^[A-Za-z0-9_.-]+$")
    # where the targets come from: the store ("cache"), or the fold's teachers in memory on each batch —
    # "online-patch" (each teacher sees the augmented training patch alone; "online" is its old name) or
    # "online-context" (the cache's own sliding windows that meet the patch, stitched, cropped and augmented)
    source: Literal["cache", "online", "online-patch", "online-context"] = "cache"
    temperature: float = Field(2.0, gt=0)
    terms: list[TermConfig] = Field(default_factory=_teachformer_terms)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    teachers: list[str] | None = None
    balance: BalanceConfig = Field(default_factory=BalanceConfig)

    def key_fields(self) -> dict[str, Any]:
        """The recipe as run keys hash it: every field, ``balance`` only where it changes training (so the health
        check's interval never makes a finished run look like another, nor do runs made before it existed).

        The student without distillation (``kind: none``) reads none of the other fields: its key is its kind
        alone, so changing a config's default recipe does not make its finished no-KD runs look like other runs.
        """
        if self.kind == "none":
            return {"kind": "none"}
        dump = self.model_dump(mode="json")
        if not self.balance.changes_training:
            dump.pop("balance")
        elif self.balance.grad_fraction is None:  # a ramp alone: the measurement interval changes no step
            dump["balance"].pop("every")
        return dump

    @field_validator("source")
    @classmethod
    def _name_online_mode(cls, value: str) -> str:
        return "online-patch" if value == "online" else value

    @property
    def online_mode(self) -> str | None:
        """``"patch"`` or ``"context"`` for a recipe distilled online, ``None`` from the cache."""
        return self.source.removeprefix("online-") if self.source != "cache" else None

    @model_validator(mode="after")
    def _check_terms(self) -> DistillationConfig:
        names = [t.name for t in self.terms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"distillation terms must be unique; repeated: {', '.join(repeated)}")
        return self


class PrimaryEndpointConfig(_Strict):
    """The one comparison the cross-validation report's claim rests on: the student run kind ``arm`` minus the
    run kind ``baseline``, mean foreground Dice, over folds. Kinds are run folders' names without ``kd-``
    (``teachformer``, ``teachformer-online-patch``, ``teachformer-online-context``, ``none``)."""

    # None: the config's own recipe distilled from the cache (distillation.kind)
    arm: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    baseline: str = Field("none", pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="after")
    def _check_arms(self) -> PrimaryEndpointConfig:
        if self.arm is not None and self.arm == self.baseline:
            raise ValueError(f"arm and baseline are both '{self.arm}': the endpoint compares two run kinds")
        return self


class EvaluationConfig(_Strict):
    """How the cross-validation report compares runs over folds (docs/evaluation.md)."""

    # `make screen`: the fraction of each fold's training cases held out, on which recipes are compared
    screening_holdout: float = Field(0.2, gt=0, lt=0.5)
    primary_endpoint: PrimaryEndpointConfig = Field(default_factory=PrimaryEndpointConfig)
    # in Dice units (0.02 = 2 points): cached vs its online twin is "equivalent" when the 90 % CI lies inside ±m
    equivalence_margin: float = Field(0.02, gt=0, lt=1)
    bootstrap_resamples: int = Field(10_000, ge=100)
    bootstrap_seed: int = 0
    # `make cv ONLINE=1` trains the online-patch twin with every seed and the online-context twin (the cache's
    # windows run afresh around every patch: expensive by design) with these training seeds only
    context_seeds: list[int] = Field(default_factory=list)


class OutputConfig(_Strict):
    """Where checkpoints, metrics and reports are written; ``results_dir``: the study's ledger, each finished run's
    records (no weights) kept to commit, so ``make cv``/``make screen`` resume on another clone without retraining
    what it holds (:mod:`core.evaluation.ledger`); unset: no ledger."""

    runs_dir: Path
    results_dir: Path | None = None


class Config(_Strict):
    """A whole experiment. See ``configs/demo.yaml`` and ``docs/configuration.md``."""

    experiment: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    dataset: DatasetConfig
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    store: StoreConfig
    teachers: list[TeacherConfig] = Field(default_factory=list)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    student: ModelConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig

    @model_validator(mode="after")
    def _check_teachers(self) -> Config:
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique; repeated: {', '.join(dupes)}")
        for wanted in self.distillation.teachers or []:
            if wanted not in names:
                raise ValueError(
                    f"distillation.teachers names '{wanted}', which is not in teachers ({', '.join(names)})"
                )
        ramp, epochs = self.distillation.balance.warmup_epochs, self.training.epochs
        if ramp > epochs:
            raise ValueError(
                f"distillation.balance.warmup_epochs ({ramp}) is longer than training.epochs ({epochs}): the KD "
                "terms would never reach their weight; shorten the ramp or train longer"
            )
        return self

    def preprocessing_hash(self) -> str:
        """SHA-256 of the canonical JSON of ``preprocessing`` (everything that shapes the cached volumes)."""
        dump = self.preprocessing.model_dump(mode="json")
        # settings added after stores existed count only when set, so those stores stay valid
        for key, default in (("reference_channel", 0), ("normalization", {})):
            if dump.get(key) == default:
                dump.pop(key, None)
        payload = json.dumps(dump, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def teacher(self, name: str) -> TeacherConfig:
        """The teacher called ``name``; raises :class:`ConfigError` listing the known names."""
        for t in self.teachers:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.teachers) or "none"
        raise ConfigError(f"no teacher named '{name}' in the config (teachers: {known})")

    def inference_for(self, teacher: TeacherConfig) -> InferenceConfig:
        """A teacher's own inference settings, falling back to the experiment's."""
        return teacher.inference or self.inference

    def distilled_teachers(self) -> list[TeacherConfig]:
        """The teachers the student learns from (``distillation.teachers``, default all)."""
        if self.distillation.teachers is None:
            return list(self.teachers)
        return [self.teacher(n) for n in self.distillation.teachers]


def _format_location(loc: tuple[Any, ...], data: Any) -> str:
    """Dotted key path, using teacher names instead of list indices where possible."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = node[item].get("name") if isinstance(node, list) and isinstance(node[item], dict) else None
            parts[-1:] = [f"{parts[-1] if parts else ''}[{name or item}]"]
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "(top level)"


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key, recursively; anything else (values, lists) is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """Read a config file, resolving ``extends: other.yaml`` (relative to the file) recursively."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML, e.g. configs/demo.yaml)")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' → '.join(str(p) for p in (*seen, path))})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be the path of another config file")
    return _merge(_read_yaml(path.parent / parent, (*seen, path.resolve())), data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate an experiment YAML file.

    Args:
        path: the YAML file.
        overrides: optional ``{"dotted.key": value}`` replacements applied before validation.

    Returns:
        The validated, frozen :class:`Config`.

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, or fails validation; the message names the
            file and every offending key.
    """
    path = Path(path)
    data = _read_yaml(path, seen=())
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return _validate(data, str(path))


def _validate(data: dict[str, Any], source: str) -> Config:
    """``data`` as a :class:`Config`, or one :class:`ConfigError` naming ``source`` and every offending key."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = _format_location(tuple(err["loc"]), data)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against docs/configuration.md)"
            lines.append(f"  {where}: {msg}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def apply_recipe(cfg: Config, path: str | Path) -> Config:
    """``cfg`` with the distillation recipe of the file ``path`` in place of its own.

    A recipe file holds one key, ``distillation`` (a whole section: its mappings are merged into the config's and its
    lists replace them, as ``extends`` does); everything else — dataset, teachers, student, training — stays the
    config's, so one recipe runs on every dataset (``configs/recipes/``, ``make screen``).

    Raises:
        ConfigError: the file is missing or not YAML, holds other keys or no ``kind``, or the result is invalid.
    """
    path = Path(path)
    data = _read_yaml(path, seen=())
    if set(data) != {"distillation"} or not isinstance(data["distillation"], dict):
        raise ConfigError(
            f"{path}: a recipe file holds one key, 'distillation' (found: {', '.join(sorted(data)) or 'nothing'}); "
            "settings of the dataset, teachers or training belong in the experiment's config"
        )
    if "kind" not in data["distillation"]:
        raise ConfigError(f"{path}: the recipe needs a distillation.kind (its runs' folder is kd-<kind>)")
    return _validate(_merge(cfg.model_dump(mode="json"), data), f"{path} applied to {cfg.experiment}")
