"""Knowledge retrieval (knowledge.py): recall on patient questions, latency, build time, and a 100k-passage scale test.

    python bench/bench_knowledge.py                     # everything, JSON on stdout (a few minutes on 2 cores)
    python bench/bench_knowledge.py --skip_scale --latency_repeats 5   # docs/BENCHMARKS.md's knowledge rows
    python bench/bench_knowledge.py --skip_scale --train_limit 0   # all training questions, no scale test

Recall@k: the share of questions whose disease is among the first k entries of format_dataset.csv. Questions
are GenMedGPT records (data/genmedgpt_{train,heldout}.json) whose answer names exactly one disease and whose
question does not name it (eval.DiseaseMatcher), and the two parts of data/lay_questions.json (everyday words,
any accepted disease counts): lay_tuning, on which knowledge.py's lay path was fitted (bench/tune_knowledge.py),
and lay_heldout, on which nothing was chosen. Each retriever ranks the same questions: the default (knowledge.py:
WEIGHTS, moved towards LAY_WEIGHTS when few symptom names are named, the message's vector through QUERY_MAP), the
same without the query map, WEIGHTS alone (the retriever before the lay path), reciprocal rank fusion of the same
six scores, BM25 over words alone, MiniLM alone (the plain baseline) and MiniLM through the query map.

Grounding: the share of messages whose entries would go into the prompt (knowledge.Retrieval.grounded) on the
diagnosis sets and on both parts of data/non_diagnosis_questions.json, with and without the diagnosis-intent
classifier (knowledge.INTENT). Latency: per message as chat.py calls
kb.retrieve, the fastest of --latency_repeats runs of each message (the CPU may be shared), then the median.

Scale: 100k synthetic passages of 250 words (words drawn from the disease descriptions) as a JSONL source,
built and queried through knowledge.py in child processes (so that peak RSS is each one's own), once with
brute-force cosine and once with the faiss HNSW index. Embedding 100k passages with MiniLM takes hours on 2
CPU cores, so the children embed passages with clustered synthetic vectors (around the real embeddings of the
disease entries) and the MiniLM time is projected from a sample; questions are embedded for real.
"""
import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import knowledge  # noqa: E402
from utils import load_records  # noqa: E402

SPLITS = {
    "train": ROOT / "data" / "genmedgpt_train.json",
    "heldout": ROOT / "data" / "genmedgpt_heldout.json",
    "lay_tuning": ROOT / "data" / "lay_questions.json",
    "lay_heldout": ROOT / "data" / "lay_questions.json",
}
NON_DIAGNOSIS = ROOT / "data" / "non_diagnosis_questions.json"
KS = (1, 3, 5, 10, 20)
RRF_K = 60  # the usual constant of reciprocal rank fusion (Cormack et al. 2009)
SCALE_PASSAGES = 100_000
SCALE_QUERIES = 50
# The knee of recall@k: an entry costs about 67 prompt tokens (SmolLM2) in format_context, so stop where one
# more entry adds under 3 points of recall. (knowledge.DEFAULT_K is also bounded by the recipe's 512 tokens.)
MIN_GAIN_PER_ENTRY = 0.03


# ----------------------------------------------------------------------------- questions

def labelled_questions(split, titles, limit=0, seed=0):
    """[(question, {indices of the right entries})]; GenMedGPT: only questions that do not name their disease."""
    from eval import DiseaseMatcher

    index = {t: i for i, t in enumerate(titles)}
    records = load_records(SPLITS[split])
    if split.startswith("lay_"):
        part = split.removeprefix("lay_")
        return [(r["input"], {index[a] for a in r["accepted"] if a in index}) for r in records if r["split"] == part]
    matcher = DiseaseMatcher(titles)
    pairs = []
    for r in records:
        disease = matcher.the_one(r["output"])
        if disease and disease not in matcher.named(r["input"]):
            pairs.append((r["input"], {index[disease]}))
    if limit and len(pairs) > limit:
        keep = np.random.default_rng(seed).choice(len(pairs), limit, replace=False)
        pairs = [pairs[i] for i in sorted(keep)]
    return pairs


# ----------------------------------------------------------------------------- retrievers

def rank_of_best(scores, right):
    """Rank (0 = first) of the best-placed right entry, ties going to the earlier entry as in knowledge.top_indices."""
    ranks = []
    for i in right:
        ahead = scores > scores[i]
        ties_before = (scores[:i] == scores[i]).sum()
        ranks.append(int(ahead.sum() + ties_before))
    return min(ranks)


def reciprocal_rank_fusion(components, k=RRF_K):
    """Sum of 1 / (k + rank) over the six rankings; the lexical ones rank only the entries they match."""
    fused = 0.0
    for name, scores in components.items():
        ranks = np.empty(len(scores), dtype=np.int64)
        ranks[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
        matched = scores > 0 if name in ("words", "phrases", "clauses", "title") else np.ones(len(scores), dtype=bool)
        fused = fused + matched / (k + ranks + 1)
    return fused


# Each scorer gets the knowledge base (with the query map), the same base without it, the message and its vectors.
RETRIEVERS = {
    "fused (default)": lambda kb, plain, q, v: kb.fused_scores(q, v),
    "fused, no query map": lambda kb, plain, q, v: plain.fused_scores(q, v),
    "fused, WEIGHTS alone (no lay path)": lambda kb, plain, q, v: kb.fused_scores(q, v, knowledge.WEIGHTS),
    "reciprocal rank fusion": lambda kb, plain, q, v: reciprocal_rank_fusion(kb.component_scores(q, v)),
    "bm25 words": lambda kb, plain, q, v: plain.component_scores(q, v)["words"],
    "minilm": lambda kb, plain, q, v: plain.component_scores(q, v)["dense"],
    "minilm through the query map": lambda kb, plain, q, v: kb.component_scores(q, v)["dense"],
}


def recall_table(kb, plain, pairs):
    vectors = knowledge.encode_messages([q for q, _ in pairs])
    table, curves = {}, {}
    for name, scorer in RETRIEVERS.items():
        ranks = np.array([rank_of_best(scorer(kb, plain, q, v), right) for (q, right), v in zip(pairs, vectors)])
        table[name] = {f"recall@{k}": round(float(np.mean(ranks < k)), 3) for k in KS}
        curves[name] = [float(np.mean(ranks < k)) for k in range(1, 21)]
    return table, curves


def choose_k(curve):
    """The smallest k after which one more entry adds less than MIN_GAIN_PER_ENTRY recall."""
    for k in range(1, len(curve)):
        if curve[k] - curve[k - 1] < MIN_GAIN_PER_ENTRY:
            return k
    return len(curve)


def latency(kb, questions, k=knowledge.DEFAULT_K, repeats=1):
    """Per message, as chat.py calls kb.retrieve: embed the message and its clauses, score, take the top k, decide
    whether to ground. Each message's fastest of `repeats` runs (a shared CPU only ever adds time)."""
    knowledge.encode_messages(["warm up, and a clause"])
    embedding, scoring = [], []
    for q in questions:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            [encoded] = knowledge.encode_messages([q])
            middle = time.perf_counter()
            knowledge.top_indices(kb.fused_scores(q, encoded), k)
            kb.symptom_evidence(encoded)
            runs.append((middle - start, time.perf_counter() - middle))
        best = min(runs, key=sum)
        embedding.append(best[0])
        scoring.append(best[1])
    ms = lambda xs, p: round(1000 * float(np.percentile(xs, p)), 1)  # noqa: E731
    total = np.add(embedding, scoring)
    return {"search_ms_median": ms(total, 50), "search_ms_p90": ms(total, 90), "embedding_ms_median": ms(embedding, 50),
            "scoring_ms_median": ms(scoring, 50), "messages": len(questions), "repeats": repeats,
            "texts_embedded_per_message": round(float(np.mean([1 + len(knowledge.clauses(q)) for q in questions])), 1)}


def grounding_rates(kb, question_sets):
    """The share of each set's messages whose entries would go into the prompt, with the diagnosis-intent
    classifier and without it (the same retrievals, their intent dropped)."""
    retrievals = {name: kb.retrieve_batch(qs) for name, qs in question_sets.items()}

    def shares(grounded):
        return {name: round(float(np.mean([grounded(r) for r in rs])), 3) for name, rs in retrievals.items()}

    return shares(lambda r: r.grounded), shares(lambda r: dataclasses.replace(r, intent=None).grounded)


def build_times(spec):
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        knowledge.load_knowledge(spec, cache_dir=cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        kb = knowledge.load_knowledge(spec, cache_dir=cache)
        warm = time.perf_counter() - start
    assert not kb.built
    return {"build_s": round(cold, 1), "load_from_cache_s": round(warm, 2), "entries": len(kb)}


# ----------------------------------------------------------------------------- scale (child processes)

def synthetic_corpus(path, n, words_per_passage, seed=0):
    """n passages drawn word by word from the disease descriptions; 10 passages per title, as from a folder."""
    kb = knowledge.load_knowledge()
    words = " ".join(e.fields.get("description", "") for e in kb.entries).split()
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            picks = rng.integers(0, len(words), words_per_passage)
            f.write(json.dumps({"title": f"synthetic {i // 10}", "text": " ".join(words[j] for j in picks)}) + "\n")


def synthetic_embed(centres, seed=0):
    """A stand-in for knowledge.embed while building: unit vectors around the real disease embeddings."""
    rng = np.random.default_rng(seed)

    def embed(texts, batch_size=64):
        n = len(list(texts))
        vectors = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.05, (n, centres.shape[1]))
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    return embed


def peak_rss_mb():
    """This process's own peak (VmHWM): ru_maxrss would report the parent's peak in a vfork-spawned child."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def scale_child(phase, corpus, cache, faiss_min):
    """One measurement in this process; prints JSON. build: index the corpus; serve: load it and answer."""
    if phase == "build":
        centres = knowledge.load_knowledge().embeddings
        start = time.perf_counter()
        kb = knowledge.load_knowledge(str(corpus), cache_dir=cache, embed_texts=synthetic_embed(centres),
                                      faiss_min_entries=faiss_min)
        build_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in kb.cache_path.rglob("*") if f.is_file())
        return {"build_s_without_minilm": round(build_s, 1), "peak_rss_mb": peak_rss_mb(),
                "index_on_disk_mb": round(size / 2**20, 1), "faiss": kb.dense_index is not None}
    questions = [r["input"] for r in load_records(SPLITS["train"])[:SCALE_QUERIES]]
    start = time.perf_counter()
    kb = knowledge.load_knowledge(str(corpus), cache_dir=cache, faiss_min_entries=faiss_min)
    load_s = time.perf_counter() - start
    vectors = knowledge.encode_messages(questions)
    times, tops = [], []
    for q, v in zip(questions, vectors):
        start = time.perf_counter()
        scores = kb.fused_scores(q, v)
        tops.append(knowledge.top_indices(scores, 10).tolist())
        times.append(time.perf_counter() - start)
    exact_overlap = None
    if kb.dense_index is not None:  # the same questions scored exactly (brute force), to see what HNSW loses
        kb.dense_index = None
        exact = [knowledge.top_indices(kb.fused_scores(q, v), 10).tolist() for q, v in zip(questions, vectors)]
        exact_overlap = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tops, exact)])), 3)
    return {"load_s": round(load_s, 2), "scoring_ms_median": round(1000 * float(np.median(times)), 1),
            "scoring_ms_p90": round(1000 * float(np.percentile(times, 90)), 1), "peak_rss_mb": peak_rss_mb(),
            "top10_overlap_with_exact": exact_overlap}


def run_child(*args):
    out = subprocess.run([sys.executable, __file__, "--scale_child", *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"scale child {args[0]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scale_test(n, words_per_passage):
    result = {"passages": n, "words_per_passage": words_per_passage}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "synthetic.jsonl"
        start = time.perf_counter()
        synthetic_corpus(corpus, n, words_per_passage)
        result["corpus_mb"] = round(corpus.stat().st_size / 2**20, 1)
        result["corpus_written_s"] = round(time.perf_counter() - start, 1)
        sample = [json.loads(line)["text"] for line, _ in zip(open(corpus, encoding="utf-8"), range(64))]
        start = time.perf_counter()
        knowledge.embed(sample)
        per_passage = (time.perf_counter() - start) / len(sample)
        result["minilm_ms_per_passage"] = round(1000 * per_passage, 1)
        result["minilm_projected_s"] = round(per_passage * n)
        for name, faiss_min in (("brute_force", n + 1), ("faiss_hnsw", 1)):
            cache = Path(tmp) / name
            result[name] = {"build": run_child("build", corpus, cache, faiss_min),
                            "serve": run_child("serve", corpus, cache, faiss_min)}
    return result


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", default="train,heldout,lay_tuning,lay_heldout")
    p.add_argument("--latency_repeats", type=int, default=3, help="runs of each message; its fastest counts")
    p.add_argument("--train_limit", type=int, default=500, help="questions drawn from the train split (0: all)")
    p.add_argument("--skip_scale", action="store_true")
    p.add_argument("--scale_passages", type=int, default=SCALE_PASSAGES)
    p.add_argument("--words_per_passage", type=int, default=knowledge.PASSAGE_WORDS)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--scale_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scale_child:
        phase, corpus, cache, faiss_min = args.scale_child
        print(json.dumps(scale_child(phase, Path(corpus), Path(cache), int(faiss_min))))
        return
    result = {"torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
    result["build"] = build_times(knowledge.DEFAULT_KNOWLEDGE)
    kb = knowledge.load_knowledge()
    plain = knowledge.load_knowledge(query_map=None)
    titles = [e.title for e in kb.entries]
    result["recall"] = {}
    for split in args.splits.split(","):
        pairs = labelled_questions(split, titles, limit=args.train_limit if split == "train" else 0)
        table, curves = recall_table(kb, plain, pairs)
        result["recall"][split] = {"questions": len(pairs), **table}
        if split == "train":
            curve = curves["fused (default)"]
            result["k"] = {"recall_at_k_train": [round(r, 3) for r in curve], "knee": choose_k(curve),
                           "knee_rule": f"smallest k after which one more entry adds < {MIN_GAIN_PER_ENTRY:.0%} recall",
                           "default": knowledge.DEFAULT_K}
            result["latency"] = latency(kb, [q for q, _ in pairs[:100]], repeats=args.latency_repeats)
    non_diagnosis = load_records(NON_DIAGNOSIS)
    sets = {f"non_diagnosis_{part}": [r["input"] for r in non_diagnosis if r["split"] == part]
            for part in ("tuning", "heldout")}
    sets |= {split: [q for q, _ in labelled_questions(split, titles)] for split in ("heldout", "lay_tuning", "lay_heldout")}
    result["grounded_share"], result["grounded_share_without_intent"] = grounding_rates(kb, sets)
    if not args.skip_scale:
        result["scale"] = scale_test(args.scale_passages, args.words_per_passage)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
