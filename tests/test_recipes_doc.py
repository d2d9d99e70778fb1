"""scripts/recipes_doc.py: the recipes × datasets table and the rule that picks the default, from reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("recipes_doc", ROOT / "scripts" / "recipes_doc.py")
recipes_doc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipes_doc)


def _report(diffs: dict[str, float], harm: str | None = None, ensemble: float = 0.8) -> dict:
    entries = [
        {
            "run": f"student kd-{k}",
            "against": "student kd-none",
            "mean_difference": d,
            "t_interval": [d - 0.02, d + 0.02],
            "n_folds": 5,
        }
        for k, d in diffs.items()
    ]
    return {
        "fold_level": {
            "primary": entries[0],
            "secondary": entries[1:],
            "harm_flags": [f"{harm} hurts class vessel: -8.0 points against none, 95 % CI [-12.0, -4.0]"]
            if harm
            else [],
        },
        "health_warnings": [],
        "against_teacher_ensemble": [
            {
                "run": "student kd-none",
                "dice": 0.7,
                "ensemble_dice": ensemble,
                "ratio": 0.7 / ensemble,
                "n": 20,
            }
        ],
    }


def test_the_rule_takes_the_best_worst_dataset_among_recipes_that_never_harm():
    reports = {
        "a": _report({"paper": 0.05, "cb": 0.02, "dkd": 0.04}),
        "b": _report({"paper": -0.03, "cb": 0.01, "dkd": 0.03}, harm="kd-dkd"),
    }
    assert recipes_doc.choose(reports)[0] == "cb", "dkd harms a class; the paper's worst dataset is −3"
    assert "hurts least" not in recipes_doc.choose(reports)[1]
    worse = {"a": _report({"paper": 0.05, "cb": -0.01}), "b": _report({"paper": -0.03, "cb": 0.01})}
    chosen, why = recipes_doc.choose(worse)
    assert chosen == "cb" and "worst dataset -1.0 points" in why and "no recipe helps on every dataset" in why
    lines = recipes_doc.table({**reports, "c": None})
    text = "\n".join(lines)
    assert "| `cb` | +2.0 [+0.0, +4.0] (5) | +1.0 [-1.0, +3.0] (5) | not run |" in text
    assert (
        "⚑" in text
        and "| *teachers' ensemble − no KD (validation cases)* | +10.0 | +10.0 | not run |" in text
    )
    assert "none yet (not every dataset has been run)" in text
    # a dataset screened but not yet cross-validated: its check is the screening's, on the held-out cases, said so
    checked = "\n".join(recipes_doc.table(reports, {"a": reports["a"], "b": None}))
    assert "| +10.0 | +10.0 (held-out cases) |" in checked
    # every dataset run, but b over 5 of its 6 folds (a study stopped between folds): no choice yet
    partial = "\n".join(recipes_doc.table(reports, folds={"a": 5, "b": 6}))
    assert "none yet (not every fold has been run: b)" in partial
    assert "**cb**" in "\n".join(recipes_doc.table(reports, folds={"a": 5, "b": 5}))
    final = "\n".join(recipes_doc.table(reports, rule=False))
    assert "rule's choice" not in final, "the final evaluation chooses nothing: the screening did"


def test_the_table_is_written_between_its_markers(tmp_path):
    doc = tmp_path / "recipes.md"
    doc.write_text("before\n<!-- recipes:start -->\nold\n<!-- recipes:end -->\nafter\n")
    recipes_doc.rewrite(doc, "recipes", ["new", "lines"])
    assert doc.read_text() == "before\n<!-- recipes:start -->\nnew\nlines\n<!-- recipes:end -->\nafter\n"
    with pytest.raises(SystemExit, match="no <!-- recipes-final:start -->"):
        recipes_doc.rewrite(doc, "recipes-final", ["x"])


def test_the_dataset_check_comes_from_the_ledger_before_any_cross_validation(tmp_path):
    from types import SimpleNamespace

    root = tmp_path / "results"
    (root / "teacher_ensemble").mkdir(parents=True)
    for fold, (ens, alone) in enumerate([((0.9, 0.7), (0.6, 0.5)), ((0.8, 0.8), (0.7, 0.7))]):
        scores = {f"{fold}/case_{i}": [d, 5.0] for i, d in enumerate(ens)}
        (root / "teacher_ensemble" / f"fold_{fold}.json").write_text(
            json.dumps({"cases": "validation", "scores": scores})
        )
        run = root / "screening" / "students" / "kd-none" / f"fold_{fold}"
        run.mkdir(parents=True)
        rows = "".join(f"case_{i},{d}\n" for i, d in enumerate(alone))
        (run / "validation_per_case.csv").write_text("case,mean_dice\n" + rows)
    # a held-out ensemble in the screening's own ledger is not the dataset check
    (root / "screening" / "teacher_ensemble").mkdir()
    cfg = SimpleNamespace(output=SimpleNamespace(results_dir=root))
    margin, folds = recipes_doc.ledger_check(cfg)
    assert folds == 2 and margin == pytest.approx(((0.3 + 0.2) / 2 + 0.1) / 2)
    text = "\n".join(recipes_doc.table({"a": None}, {"a": None}, ledger_checks={"a": (margin, folds)}))
    assert (
        "| *teachers' ensemble − no KD (validation cases)* | +17.5 (2 folds, student alone from the screening) |"
        in text
    )
    assert recipes_doc.ledger_check(SimpleNamespace(output=SimpleNamespace(results_dir=None))) is None
