"""Fit knowledge.py's lay-language path and its grounding threshold on tuning data only; prints JSON.

    python bench/tune_knowledge.py                   # a few minutes on 2 cores (embeds ~400 messages)

What it reads: 300 questions of the GenMedGPT training split (data/genmedgpt_train.json), the tuning part of
data/lay_questions.json and the tuning part of data/non_diagnosis_questions.json (`"split": "tuning"`). The held-out
parts, and data/genmedgpt_heldout.json, are never opened here: bench/bench_knowledge.py reports them after the
choice. What it chooses:
- LAY_NAMED_SYMPTOMS, LAY_WEIGHTS' dense and description weights: the grid point with the best mean of recall@1 and
  recall@5 over the GenMedGPT and lay tuning questions (equal weight to each set);
- GROUND_MIN_EVIDENCE: the symptom evidence (knowledge.KnowledgeBase.symptom_evidence) from which a message is
  grounded, the threshold with the best balanced accuracy between diagnosis questions (GenMedGPT and lay tuning)
  and the non-diagnosis tuning questions.
The values chosen are copied into knowledge.py by hand, with this command beside them.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import knowledge  # noqa: E402
from bench_knowledge import labelled_questions, rank_of_best  # noqa: E402
from utils import load_records  # noqa: E402

LAY = ROOT / "data" / "lay_questions.json"
NON_DIAGNOSIS = ROOT / "data" / "non_diagnosis_questions.json"
GRID = {"named": (1, 2, 3, 4), "dense": (1.0, 2.0, 3.0), "description": (0.5, 1.0, 1.5, 2.0)}


def tuning_part(path):
    """The records of an eval file whose "split" is "tuning": the only ones a choice may be made on."""
    return [r for r in load_records(path) if r.get("split") == "tuning"]


def lay_pairs(records, titles):
    index = {t: i for i, t in enumerate(titles)}
    return [(r["input"], {index[a] for a in r["accepted"]}) for r in records]


def scored(kb, pairs):
    """Per question: its components, how many symptom names it names, and its symptom evidence."""
    out = []
    for (q, right), encoded in zip(pairs, knowledge.encode_messages([q for q, _ in pairs])):
        named = len(kb.named_symptoms(set(knowledge.tokenize([q])[0])))
        out.append((right, kb.component_scores(q, encoded), named, kb.symptom_evidence(encoded)))
    return out


def weights(named, n, dense, description):
    clinical = 1.0 if n == 0 else min(1.0, named / n)  # n = 0: WEIGHTS alone
    lay = {**knowledge.LAY_WEIGHTS, "dense": dense, "description": description}
    return {k: clinical * knowledge.WEIGHTS[k] + (1 - clinical) * lay[k] for k in knowledge.WEIGHTS}


def fused(components, w):
    return sum(wt * (knowledge._scaled(components[k]) if k in knowledge.SCALED_SCORES else components[k])
               for k, wt in w.items())


def recall(rows, n, dense, description):
    ranks = np.array([rank_of_best(fused(c, weights(named, n, dense, description)), right)
                      for right, c, named, _ in rows])
    return {f"recall@{k}": round(float(np.mean(ranks < k)), 3) for k in (1, 3, 5, 10)}


def best_threshold(grounded, not_grounded):
    """The evidence threshold with the best balanced accuracy (ties: the lower one, which grounds more)."""
    grounded, not_grounded = np.asarray(grounded), np.asarray(not_grounded)
    best = None
    for t in np.unique(np.round(np.concatenate([grounded, not_grounded]), 3)):
        accuracy = (np.mean(grounded >= t) + np.mean(not_grounded < t)) / 2
        if best is None or accuracy > best[0] + 1e-9:
            best = (float(accuracy), float(t), float(np.mean(grounded >= t)), float(np.mean(not_grounded < t)))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_limit", type=int, default=300)
    args = p.parse_args()
    kb = knowledge.load_knowledge()
    titles = [e.title for e in kb.entries]
    sets = {"genmedgpt_train": labelled_questions("train", titles, limit=args.train_limit),
            "lay_tuning": lay_pairs(tuning_part(LAY), titles)}
    rows = {name: scored(kb, pairs) for name, pairs in sets.items()}
    grid = []
    for n, dense, description in itertools.product(*GRID.values()):
        r = {name: recall(rs, n, dense, description) for name, rs in rows.items()}
        objective = np.mean([(x["recall@1"] + x["recall@5"]) / 2 for x in r.values()])
        grid.append({"objective": round(float(objective), 4), "LAY_NAMED_SYMPTOMS": n, "dense": dense,
                     "description": description, **r})
    grid.sort(key=lambda g: -g["objective"])
    non_diagnosis = [q["input"] for q in tuning_part(NON_DIAGNOSIS)]
    evidence_off = [kb.symptom_evidence(v) for v in knowledge.encode_messages(non_diagnosis)]
    evidence_on = [e for rs in rows.values() for _, _, _, e in rs]
    accuracy, threshold, kept, left_out = best_threshold(evidence_on, evidence_off)
    current = {name: recall(rs, knowledge.LAY_NAMED_SYMPTOMS, knowledge.LAY_WEIGHTS["dense"],
                            knowledge.LAY_WEIGHTS["description"]) for name, rs in rows.items()}
    print(json.dumps({"questions": {k: len(v) for k, v in sets.items()} | {"non_diagnosis_tuning": len(non_diagnosis)},
                      "best": grid[:5], "knowledge.py now": current,
                      "without the lay path": {name: recall(rs, 0, 0, 0) for name, rs in rows.items()},
                      "grounding": {"GROUND_MIN_EVIDENCE": round(threshold, 3), "balanced_accuracy": round(accuracy, 3),
                                    "diagnosis questions grounded": round(kept, 3),
                                    "non-diagnosis questions left ungrounded": round(left_out, 3)}}, indent=1))


if __name__ == "__main__":
    main()
