"""How each loss term pulls on the student: its value, the norm of its (weighted) gradient on the student's weights,
and the cosine between that gradient and L_SEG's, averaged over training patches of one fold.

A distillation term whose gradient is large beside L_SEG's and points against it (negative cosine) fights the
labels; docs/recipes.md uses this to explain when distillation hurts. Training runs take the same measurement every
``distillation.balance.every`` steps (core/training/health.py, the health check); this script takes it offline, on a
chosen checkpoint.

    .venv/bin/python scripts/term_gradients.py -c configs/demo-thin.yaml --fold 0 \
        [--checkpoint runs/demo-thin/students/kd-none/fold_0/checkpoint_final.pth] [--batches 20]

Without ``--checkpoint`` the student is freshly initialised (as at the start of training).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from core.config import load_config
from core.data.patches import PatchDataset, TargetRequest, targets_from_batch
from core.experiment import fold_split, open_store_for
from core.losses.distillation import build_objective
from core.models import TapRecorder, create_model, get_spec
from core.models.checkpoint import load_checkpoint
from core.terms import targets_needed
from core.training.health import term_gradients
from core.training.run import run_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--checkpoint")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()

    cfg = load_config(args.config)
    store = open_store_for(cfg)
    train, _ = fold_split(cfg, store, args.fold)
    meta = store.metadata["dataset"]
    in_channels, num_classes = len(meta["channel_names"]), len(meta["class_names"])
    dcfg = cfg.distillation
    keys = tuple(t.store_key(args.fold) for t in cfg.distilled_teachers())
    loss = build_objective(dcfg, cfg.training.focal_gamma, {k: 1.0 for k in keys})
    spec = get_spec(cfg.student.arch)
    torch.manual_seed(run_seed(cfg.seed, cfg.training.seed))
    model = create_model(cfg.student.arch, in_channels, num_classes, cfg.student.args)
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint).state_dict)
    model.eval()
    needed = targets_needed([] if dcfg.kind == "none" else [(t.name, t.weight) for t in dcfg.terms])
    request = TargetRequest.for_recipe(keys, dcfg.temperature, needed)
    dataset = PatchDataset(
        store.location,
        train,
        cfg.training.patch_size,
        length=args.batches * cfg.training.batch_size,
        foreground_oversampling=cfg.training.foreground_oversampling,
        seed=12345,
        targets=request,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.training.batch_size)
    weights = dict(zip(loss.names, loss.term_weights, strict=True))
    rows: dict[str, list[tuple[float, float, float]]] = {}
    agreement = []
    for batch in loader:
        image, label = batch["image"], batch["label"]
        targets = targets_from_batch(batch, request, torch.device("cpu"))
        with TapRecorder(model, spec.taps) as recorder:
            logits = model(image)
        terms = loss(logits, label, dict(recorder.features), targets)
        params = [p for p in model.parameters() if p.requires_grad]
        weighted = {"seg": terms["seg"], **{n: weights[n] * terms[n] for n in loss.names if weights[n] > 0}}
        grads = term_gradients(weighted, list(weighted), params)
        for name, g in grads.items():
            cos = torch.nn.functional.cosine_similarity(g, grads["seg"], dim=0).item()
            rows.setdefault(name, []).append((float(terms[name].detach()), float(g.norm()), cos))
        if "softmax" in targets:
            mean = torch.stack(list(targets["softmax"].values())).mean(0)  # teachers' averaged distribution
            agreement.append(float((mean.argmax(1) == label[:, 0]).float().mean()))
    out = {
        name: {
            "value": float(np.mean([r[0] for r in v])),
            "grad_norm_on_weights": float(np.mean([r[1] for r in v])),
            "cosine_with_seg_grad": float(np.mean([r[2] for r in v])),
        }
        for name, v in rows.items()
    }
    if agreement:
        out["teacher_argmax_agrees_with_label"] = float(np.mean(agreement))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
