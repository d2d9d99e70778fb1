"""Where does online distillation lose against the cache? Teacher targets on the same training patches, per source.

Online distillation (``distillation.source: online``) differs from the cache in three ways at once: the teachers see
each training patch alone (the cache stitches overlapping, Gaussian-weighted windows over the whole volume), they
see it after augmentation (the cache labelled the un-augmented volume; its maps are then flipped and rotated with
the patch), and they give exact float32 probabilities (the cache stores an encoding). This script separates them on
a fold's training patches (the student's own patch sampler, same seeds), for each teacher and their average:

- ``cached``: the store's decoded softmax, cut to the patch (what cached distillation trains on);
- ``full fp32``: the teacher's sliding-window over the whole volume in float32, cut to the patch (cache without
  the encoding);
- ``patch + m``: the teacher's sliding-window over the patch grown by ``m`` voxels of context on each side, cut
  back to the patch (m = 0: the patch alone, the online regime without augmentation);
- ``online``: the teacher on the augmented patch, as online distillation runs it, scored against the augmented
  label (``cached, augmented`` is the cache's maps given the same augmentation).

For each: the teacher's foreground Dice against the label over all patches pooled, and the mean KL per voxel
from the cached target (nats). Usage::

    python scripts/online_gap.py --config configs/demo.yaml --fold 0 --patches 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from core.config import load_config
from core.data.patches import PatchDataset, TargetRequest
from core.experiment import fold_split, open_store_for
from core.inference import predict_volume, resolve_device
from core.losses.attention import normalise_map
from core.models.checkpoint import build_from_checkpoint
from core.models.registry import get_spec
from core.models.taps import TapRecorder, attention_map
from core.terms import ATTENTION_KINDS, ONLINE_KINDS, TargetsNeeded


def _dice_counts(probs: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes − 1, 3) of intersection, predicted and true voxel counts of each foreground class."""
    pred = probs.argmax(0)
    return np.array(
        [
            [np.sum((pred == c) & (label == c)), np.sum(pred == c), np.sum(label == c)]
            for c in range(1, num_classes)
        ],
        dtype=np.float64,
    )


def _dice(counts: np.ndarray) -> float:
    return float(np.mean(2 * counts[:, 0] / np.maximum(counts[:, 1] + counts[:, 2], 1)))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np.clip(p, 1e-8, 1), np.clip(q, 1e-8, 1)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--margins", default="0,8,16")
    parser.add_argument("--out", default=None, help="JSON file for the numbers")
    args = parser.parse_args()
    margins = [int(m) for m in args.margins.split(",")]

    cfg = load_config(args.config)
    store = open_store_for(cfg)
    train, _ = fold_split(cfg, store, args.fold)
    meta = store.metadata["dataset"]
    num_classes, in_channels = len(meta["class_names"]), len(meta["channel_names"])
    device = resolve_device(cfg.training.device)
    teachers = [t.for_fold(args.fold) for t in cfg.distilled_teachers()]
    keys = [t.store_key(args.fold) for t in cfg.distilled_teachers()]
    # everything teachers in memory give (softmax at T = 1, attention maps), cached alike for the comparison
    request = TargetRequest.for_recipe(keys, 1.0, TargetsNeeded(ONLINE_KINDS))
    common = dict(
        store_path=store.location,
        case_ids=train,
        patch_size=cfg.training.patch_size,
        length=args.patches,
        foreground_oversampling=cfg.training.foreground_oversampling,
        seed=cfg.seed,
        targets=request,
        augmentation=cfg.training.augmentation,
    )
    plain = PatchDataset(**common, augment=False)
    augmented = PatchDataset(**common, augment=True)
    patch = np.array(cfg.training.patch_size)

    conditions = ["cached", "full fp32", *[f"patch + {m}" for m in margins], "cached, augmented", "online"]
    counts = {c: {k: 0.0 for k in [*keys, "mean"]} for c in conditions}
    kls = {c: {k: [] for k in [*keys, "mean"]} for c in conditions}
    models = []
    for teacher in teachers:
        model, _ = build_from_checkpoint(
            teacher.checkpoint, teacher.arch, in_channels, num_classes, teacher.args
        )
        models.append((model.to(device).eval(), cfg.inference_for(teacher)))
    full: dict[tuple[str, str], np.ndarray] = {}
    # attention maps: the AFS distance (squared L2 of the L2-normalised maps, as the loss) from the cached map
    afs = {(k, kind): [] for k in keys for kind in ATTENTION_KINDS}
    afs_shift = {(k, kind): [] for k in keys for kind in ATTENTION_KINDS}

    for i in range(args.patches):
        rng = np.random.default_rng([plain.seed, 0, i])  # the box PatchDataset draws for item i of epoch 0
        case_id = plain.case_ids[int(rng.integers(len(plain.case_ids)))]
        start, _ = plain._box(rng, case_id)
        item, aug = plain[i], augmented[i]
        label, aug_label = item["label"][0].numpy(), aug["label"][0].numpy()
        shape = np.array(store.case_shape(case_id))
        per: dict[str, dict[str, np.ndarray]] = {c: {} for c in conditions}
        for key, (model, inference) in zip(keys, models, strict=True):
            cached = item[f"softmax/{key}"].numpy()
            per["cached"][key] = cached
            per["cached, augmented"][key] = aug[f"softmax/{key}"].numpy()
            if (key, case_id) not in full:
                logits = predict_volume(model, store.read_image(case_id), inference, device, amp=False)[
                    "logits"
                ]
                full[(key, case_id)] = torch.softmax(torch.from_numpy(logits), 0).numpy()
            sl = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
            per["full fp32"][key] = full[(key, case_id)][(slice(None), *sl)]
            for m in margins:
                lo = np.maximum(np.array(start) - m, 0)
                hi = np.minimum(np.array(start) + patch + m, shape)
                box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
                window = inference.model_copy(update={"roi_size": list(patch)}) if m == 0 else inference
                grown = predict_volume(model, store.read_image(case_id, box), window, device, amp=False)[
                    "logits"
                ]
                inner = tuple(
                    slice(int(s - a), int(s - a + p)) for s, a, p in zip(start, lo, patch, strict=True)
                )
                per[f"patch + {m}"][key] = torch.softmax(
                    torch.from_numpy(grown[(slice(None), *inner)]), 0
                ).numpy()
            spec = get_spec(teachers[keys.index(key)].arch)
            with torch.no_grad(), TapRecorder(model, spec.taps) as recorder:
                logits = model(aug["image"][None].to(device)).float().cpu()[0]
            per["online"][key] = torch.softmax(logits, 0).numpy()
            for kind in ATTENTION_KINDS:
                online_map = attention_map(recorder.features[kind], cfg.distillation.attention.p).cpu()
                cached_map = aug[f"{kind}/{key}"][None]
                if online_map.shape != cached_map.shape:
                    raise SystemExit(f"{key} {kind}: online {online_map.shape} vs cached {cached_map.shape}")
                a, b = normalise_map(online_map), normalise_map(cached_map)
                afs[(key, kind)].append(float(((a - b) ** 2).sum()))
                # a reference for scale: the cached map against the cached map of another patch position
                other = augmented[(i + 1) % args.patches][f"{kind}/{key}"][None]
                afs_shift[(key, kind)].append(float(((normalise_map(other) - b) ** 2).sum()))
        for c in conditions:
            per[c]["mean"] = np.mean([per[c][k] for k in keys], axis=0)
            ref = per["cached, augmented"] if c in ("online", "cached, augmented") else per["cached"]
            lab = aug_label if c in ("online", "cached, augmented") else label
            for k in [*keys, "mean"]:
                counts[c][k] = counts[c][k] + _dice_counts(per[c][k], lab, num_classes)
                kls[c][k].append(_kl(ref[k], per[c][k]))

    table = {
        c: {k: {"dice": _dice(counts[c][k]), "kl_from_cached": float(np.mean(kls[c][k]))} for k in counts[c]}
        for c in conditions
    }
    names = [*keys, "mean"]
    print(
        f"fold {args.fold}, {args.patches} training patches of {tuple(patch)}: teacher Dice (KL from cached, nats)"
    )
    print("| source | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for c in conditions:
        cells = [f"{table[c][k]['dice']:.3f} ({table[c][k]['kl_from_cached']:.3f})" for k in names]
        print(f"| {c} | " + " | ".join(cells) + " |")
    print(
        "\nattention maps, online (patch alone, augmented) against cached (whole volume, cut, same augmentation):"
    )
    print(
        "AFS distance ||a/|a| - b/|b|||^2 (0 = same map, 2 = orthogonal); reference: cached map of the next patch"
    )
    maps = {}
    for (key, kind), values in afs.items():
        cells = f"{np.mean(values):.3f}", f"{np.mean(afs_shift[(key, kind)]):.3f}"
        maps[f"{key} {kind}"] = {"online_vs_cached": float(np.mean(values)), "next_patch": float(cells[1])}
        print(
            f"  {key:24s} {kind:6s} online {cells[0]}   next patch {cells[1]}   cells {tuple(aug[f'{kind}/{key}'].shape[1:])}"
        )
    if args.out:
        out = {"fold": args.fold, "patches": args.patches, "table": table, "attention": maps}
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
