"""Fit knowledge.py's lay-language path and its grounding threshold on tuning data only; prints JSON.

    python bench/tune_knowledge.py                   # a few minutes on 2 cores (embeds ~400 messages)
    python bench/tune_knowledge.py --fit_query_map   # first refits data/knowledge_query_map.npy (~6 min more)
    python bench/tune_knowledge.py --fit_intent      # also refits data/knowledge_intent.npy (seconds more)

What it reads: 300 questions of the GenMedGPT training split (data/genmedgpt_train.json), the tuning part of
data/lay_questions.json and the tuning part of data/non_diagnosis_questions.json (`"split": "tuning"`). The held-out
parts, and data/genmedgpt_heldout.json, are never opened here: bench/bench_knowledge.py reports them after the
choice. What it chooses:
- with --fit_query_map, knowledge.QUERY_MAP: for each point of MAP_GRID, a linear map fitted on the GenMedGPT
  training questions that are not among the 300 above (fit_query_map); the point whose map gives the best mean of
  recall@1 and recall@5 on the lay tuning messages (the map's cosines alone) is written. Then the rest runs with it;
- LAY_NAMED_SYMPTOMS, LAY_WEIGHTS' dense and description weights: the grid point with the best mean of recall@1 and
  recall@5 over the GenMedGPT and lay tuning questions (equal weight to each set);
- GROUND_MIN_EVIDENCE and GROUND_MIN_MARGIN: the symptom evidence (knowledge.KnowledgeBase.symptom_evidence) from
  which a message is grounded, and by how much it must exceed the test-or-medicine evidence (care_evidence): the
  pair with the best balanced accuracy between diagnosis questions (GenMedGPT and lay tuning) and the
  non-diagnosis tuning questions;
- with --fit_intent, knowledge.INTENT: a class-balanced logistic regression on the messages' MiniLM vectors,
  diagnosis questions (the same ones) against the non-diagnosis tuning questions; its regularisation C (INTENT_GRID)
  and knowledge.INTENT_MIN (INTENT_THRESHOLDS): the pair whose whole grounding rule (evidence, margin and intent)
  has the best balanced accuracy in 10-fold cross-validation; the classifier is then fitted on all of them and
  written.
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
GRID = {"named": (1, 2, 3, 4, 5, 6), "dense": (1.0, 2.0, 3.0), "description": (0.5, 1.0, 1.5, 2.0, 3.0)}
MAP_GRID = {"strength": (0.03, 0.1, 0.3, 1.0), "temperature": (0.05, 0.1)}
INTENT_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)  # logistic regression's C (inverse regularisation)
INTENT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)  # ascending: on a tie the lower one, which grounds more, is kept
INTENT_FOLDS = 10


def fit_query_map(vectors, answers, entry_matrices, strength, temperature, steps=200, seed=0):
    """A square matrix M such that each question vector v, mapped to v M, is nearest its answer's entry: the
    cross-entropy over every entry of (the summed cosines of v M with entry_matrices) / temperature, plus `strength`
    times the squared distance of M from the identity (what keeps it near the encoder's own geometry). Full-batch
    Adam, deterministic for a seed."""
    import torch

    torch.manual_seed(seed)
    identity = torch.eye(vectors.shape[1])
    matrix = identity.clone().requires_grad_(True)
    questions, answers = torch.from_numpy(vectors), torch.as_tensor(answers)
    entries = [torch.from_numpy(m) for m in entry_matrices]
    optimizer = torch.optim.Adam([matrix], lr=2e-3)
    for _ in range(steps):
        mapped = torch.nn.functional.normalize(questions @ matrix, dim=1)
        logits = sum(mapped @ e.T for e in entries) / temperature
        loss = torch.nn.functional.cross_entropy(logits, answers) + strength * ((matrix - identity) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return matrix.detach().numpy()


def mapped_recall(matrix, encoded, pairs, entry_matrices):
    """Recall@1/5 of the map's cosines alone (dense + description) on (question, right entries) pairs."""
    ranks = []
    for (vector, _), (_, right) in zip(encoded, pairs):
        mapped = vector @ matrix
        mapped /= np.linalg.norm(mapped)
        ranks.append(rank_of_best(sum(m @ mapped for m in entry_matrices), right))
    ranks = np.array(ranks)
    return {f"recall@{k}": round(float(np.mean(ranks < k)), 3) for k in (1, 5)}


def choose_query_map(kb, titles, fusion_questions, lay, out_path):
    """Fit a map per MAP_GRID point, keep the best on the lay tuning messages, write it to out_path."""
    held_back = {q for q, _ in fusion_questions}
    fit_pairs = [(q, right) for q, right in labelled_questions("train", titles) if q not in held_back]
    print(f"embedding {len(fit_pairs)} GenMedGPT training questions", file=sys.stderr, flush=True)
    vectors = knowledge.embed([q for q, _ in fit_pairs])
    answers = [min(right) for _, right in fit_pairs]
    entry_matrices = [kb.embeddings, kb.description_embeddings]
    lay_encoded = knowledge.encode_messages([q for q, _ in lay])
    identity = np.eye(vectors.shape[1], dtype=np.float32)
    grid = [{"strength": None, "temperature": None, **mapped_recall(identity, lay_encoded, lay, entry_matrices)}]
    best = None
    for strength, temperature in itertools.product(*MAP_GRID.values()):
        matrix = fit_query_map(vectors, answers, entry_matrices, strength, temperature)
        row = {"strength": strength, "temperature": temperature,
               **mapped_recall(matrix, lay_encoded, lay, entry_matrices)}
        grid.append(row)
        objective = row["recall@1"] + row["recall@5"]
        if best is None or objective > best[0] + 1e-9:
            best = (objective, matrix, row)
    np.save(out_path, best[1].astype(np.float32))
    return {"fitted_on_questions": len(fit_pairs), "chosen": best[2], "written": str(out_path),
            "grid (lay tuning, map's cosines alone; strength None = no map)": grid}


def fit_intent(vectors, asks_diagnosis, c):
    """knowledge.INTENT's numbers: a class-balanced logistic regression of asks_diagnosis (bool per message) on the
    message vectors; the weights, then the bias."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(vectors, asks_diagnosis)
    return np.append(model.coef_[0], model.intercept_[0]).astype(np.float32)


def choose_intent(vectors, asks_diagnosis, rule_grounds, out_path):
    """Per INTENT_GRID C and INTENT_THRESHOLDS threshold: the balanced accuracy, in stratified cross-validation, of
    grounding a message when rule_grounds (evidence and margin) and its held-out-fold intent >= the threshold (ties:
    the lower threshold, which grounds more). The best C is refitted on every message and written to out_path; the
    threshold is knowledge.INTENT_MIN's."""
    from sklearn.model_selection import StratifiedKFold

    asks_diagnosis, rule_grounds = np.asarray(asks_diagnosis), np.asarray(rule_grounds)

    def row(grounds):
        kept, left_out = float(np.mean(grounds[asks_diagnosis])), float(np.mean(~grounds[~asks_diagnosis]))
        return {"balanced_accuracy": round((kept + left_out) / 2, 4), "diagnosis questions grounded": round(kept, 3),
                "non-diagnosis questions left ungrounded": round(left_out, 3)}

    folds = list(StratifiedKFold(INTENT_FOLDS, shuffle=True, random_state=0).split(vectors, asks_diagnosis))
    grid, best = [], None
    for c in INTENT_GRID:
        probability = np.zeros(len(vectors))
        for train, test in folds:
            values = fit_intent(vectors[train], asks_diagnosis[train], c)
            probability[test] = knowledge.intent_probability(values[:-1], values[-1], vectors[test])
        for threshold in INTENT_THRESHOLDS:
            grid.append({"C": c, "INTENT_MIN": threshold, **row(rule_grounds & (probability >= threshold))})
            if best is None or grid[-1]["balanced_accuracy"] > best["balanced_accuracy"] + 1e-9:
                best = grid[-1]
    np.save(out_path, fit_intent(vectors, asks_diagnosis, best["C"]))
    return {"written": str(out_path), "chosen": best, f"grid ({INTENT_FOLDS}-fold cross-validation)": grid,
            "without intent": row(rule_grounds)}


def tuning_part(path):
    """The records of an eval file whose "split" is "tuning": the only ones a choice may be made on."""
    return [r for r in load_records(path) if r.get("split") == "tuning"]


def lay_pairs(records, titles):
    index = {t: i for i, t in enumerate(titles)}
    return [(r["input"], {index[a] for a in r["accepted"]}) for r in records]


def scored(kb, pairs):
    """Per question: its components, how many symptom names it names, its (symptom, care) evidence and its MiniLM
    vector."""
    out = []
    for (q, right), encoded in zip(pairs, knowledge.encode_messages([q for q, _ in pairs])):
        named = len(kb.named_symptoms(set(knowledge.tokenize([q])[0])))
        out.append((right, kb.component_scores(q, encoded), named, evidence(kb, encoded), encoded[0]))
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
                      for right, c, named, _, _ in rows])
    return {f"recall@{k}": round(float(np.mean(ranks < k)), 3) for k in (1, 3, 5, 10)}


MARGINS = (None, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1)  # None: the care evidence is not looked at


def evidence(kb, encoded):
    return kb.symptom_evidence(encoded), kb.care_evidence(encoded)


def grounds_by_evidence(rows, threshold, margin):
    """Per message (a row of symptom evidence, care evidence): whether evidence and margin would ground it
    (knowledge.Retrieval's describes_symptoms and more_symptoms_than_care; margin None: care not looked at)."""
    return (rows[:, 0] >= threshold) & (True if margin is None else rows[:, 0] - rows[:, 1] >= margin)


def best_grounding(grounded, not_grounded):
    """The (threshold, margin) with the best balanced accuracy (ties: the lower threshold, which grounds more).
    Each message: (symptom evidence, care evidence)."""
    grounded, not_grounded = np.asarray(grounded, dtype=float), np.asarray(not_grounded, dtype=float)

    best = None
    for t in np.unique(np.round(np.concatenate([grounded[:, 0], not_grounded[:, 0]]), 3)):
        for margin in MARGINS:
            on = np.mean(grounds_by_evidence(grounded, t, margin))
            off = np.mean(~grounds_by_evidence(not_grounded, t, margin))
            if best is None or (on + off) / 2 > best[0] + 1e-9:
                best = ((on + off) / 2, float(t), margin, float(on), float(off))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_limit", type=int, default=300)
    p.add_argument("--fit_query_map", action="store_true", help="refit knowledge.QUERY_MAP first (see above)")
    p.add_argument("--fit_intent", action="store_true", help="refit knowledge.INTENT (see above)")
    args = p.parse_args()
    kb = knowledge.load_knowledge(query_map=None if args.fit_query_map else knowledge.QUERY_MAP, intent=None)
    titles = [e.title for e in kb.entries]
    sets = {"genmedgpt_train": labelled_questions("train", titles, limit=args.train_limit),
            "lay_tuning": lay_pairs(tuning_part(LAY), titles)}
    query_map = None
    if args.fit_query_map:
        query_map = choose_query_map(kb, titles, sets["genmedgpt_train"], sets["lay_tuning"], knowledge.QUERY_MAP)
        kb = knowledge.load_knowledge(intent=None)
    rows = {name: scored(kb, pairs) for name, pairs in sets.items()}
    grid = []
    for n, dense, description in itertools.product(*GRID.values()):
        r = {name: recall(rs, n, dense, description) for name, rs in rows.items()}
        objective = np.mean([(x["recall@1"] + x["recall@5"]) / 2 for x in r.values()])
        grid.append({"objective": round(float(objective), 4), "LAY_NAMED_SYMPTOMS": n, "dense": dense,
                     "description": description, **r})
    grid.sort(key=lambda g: -g["objective"])
    non_diagnosis = [q["input"] for q in tuning_part(NON_DIAGNOSIS)]
    encoded_off = knowledge.encode_messages(non_diagnosis)
    evidence_off = [evidence(kb, v) for v in encoded_off]
    evidence_on = [e for rs in rows.values() for _, _, _, e, _ in rs]
    accuracy, threshold, margin, kept, left_out = best_grounding(evidence_on, evidence_off)
    intent = "not refitted (--fit_intent)"
    if args.fit_intent:
        vectors = np.array([v for rs in rows.values() for *_, v in rs] + [v for v, _ in encoded_off])
        rule = grounds_by_evidence(np.array(evidence_on + evidence_off, dtype=float), knowledge.GROUND_MIN_EVIDENCE,
                                   knowledge.GROUND_MIN_MARGIN)
        intent = choose_intent(vectors, [True] * len(evidence_on) + [False] * len(evidence_off), rule,
                               knowledge.INTENT)
    current = {name: recall(rs, knowledge.LAY_NAMED_SYMPTOMS, knowledge.LAY_WEIGHTS["dense"],
                            knowledge.LAY_WEIGHTS["description"]) for name, rs in rows.items()}
    print(json.dumps({"questions": {k: len(v) for k, v in sets.items()} | {"non_diagnosis_tuning": len(non_diagnosis)},
                      "query map": query_map or "not refitted (--fit_query_map)", "best": grid[:5],
                      "knowledge.py now": current,
                      "without the lay path": {name: recall(rs, 0, 0, 0) for name, rs in rows.items()},
                      "grounding": {"GROUND_MIN_EVIDENCE": round(threshold, 3), "GROUND_MIN_MARGIN": margin,
                                    "balanced_accuracy": round(accuracy, 3),
                                    "diagnosis questions grounded": round(kept, 3),
                                    "non-diagnosis questions left ungrounded": round(left_out, 3)},
                      "diagnosis intent (with knowledge.py's GROUND_MIN_EVIDENCE and GROUND_MIN_MARGIN)": intent},
                     indent=1))


if __name__ == "__main__":
    main()
