"""knowledge.py: readers, bad inputs, retrieval, the on-disk cache, prompt text, and the original pipeline."""
import csv
import io
import json
import sys
from pathlib import Path

import pytest

import knowledge
from knowledge import Entry, load_knowledge, original_answer, original_chunks, read_entries
from prompts import format_context, sources_line
from utils import DataError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import tune_knowledge  # noqa: E402
DISEASE_CSV = ROOT / "format_dataset.csv"
HEADER = "idx,disease,Symptom,reason,TestsAndProcedures,commonMedications\n"


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode(encoding))
    return path


def first_rows(n):
    """The first n diseases of format_dataset.csv as CSV text."""
    with open(DISEASE_CSV, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[: n + 1]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


# ----------------------------------------------------------------------------- readers

def test_csv_escapes_decode_to_characters(tmp_path):
    path = write(tmp_path / "db.csv", HEADER + (
        "7,Crohn\\xe2\\x80\\x99s disease,\"['Sharp abdominal pain', 'Crohn\\xe2\\x80\\x99s flare']\","
        "\"Ullrich\\xe2\\x80\\x93Turner, the patient\\'s gut\",\"['Colonoscopy']\",\"['Mesalamine']\"\n"))
    [entry] = read_entries(str(path))
    assert entry.title == "Crohn\u2019s disease"
    assert entry.fields["symptoms"] == ["Sharp abdominal pain", "Crohn\u2019s flare"]
    assert entry.fields["description"] == "Ullrich\u2013Turner, the patient's gut"
    assert entry.fields["tests"] == ["Colonoscopy"] and entry.fields["medications"] == ["Mesalamine"]
    assert (entry.id, entry.source) == ("db.csv#7", f"{path}:1")
    assert "\\x" not in entry.text


def test_the_disease_database_reads_whole_and_decoded():
    entries = read_entries(str(DISEASE_CSV))
    assert len(entries) == 796
    assert entries[0].title == "Panic disorder" and entries[0].id == "format_dataset.csv#0"
    assert all(e.fields["symptoms"] for e in entries)
    assert not any("\\x" in e.text for e in entries)
    turner = next(e for e in entries if e.title == "Turner syndrome")
    assert "Ullrich\u2013Turner" in turner.fields["description"]


def test_jsonl_entries(tmp_path):
    path = write(tmp_path / "notes.jsonl", '{"title": "Asthma", "text": "Wheezing and a cough at night."}\n\n'
                                           '{"title": "", "text": "Untitled note."}\n')
    first, second = read_entries(str(path))
    assert (first.id, first.title, first.text, first.source) == ("notes.jsonl#1", "Asthma",
                                                                 "Wheezing and a cough at night.", f"{path}:1")
    assert second.id == "notes.jsonl#3" and second.title == "notes 3"


def test_folder_of_text_is_cut_into_passages_of_at_most_250_words(tmp_path):
    write(tmp_path / "docs" / "long.txt", " ".join(f"w{i}" for i in range(600)))
    write(tmp_path / "docs" / "sub" / "short.md", "# Gout\nA red, hot big toe.")
    write(tmp_path / "docs" / "empty.txt", "")
    write(tmp_path / "docs" / ".hidden.md", "never read")
    write(tmp_path / "docs" / "image.png", b"\x89PNG")
    entries = read_entries(str(tmp_path / "docs"))
    assert [len(e.text.split()) for e in entries] == [250, 250, 100, 7]
    assert [e.id for e in entries] == ["long.txt#1", "long.txt#2", "long.txt#3", "short.md#1"]
    assert entries[1].text.split()[0] == "w250" and entries[3].title == "short"


def test_spec_reads_several_sources_in_order(tmp_path):
    notes = write(tmp_path / "notes.jsonl", '{"title": "A", "text": "alpha"}\n')
    folder = tmp_path / "docs"
    write(folder / "b.txt", "beta")
    entries = read_entries(f"{notes}, {folder}")
    assert [e.title for e in entries] == ["A", "b"]


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = {
    "missing": (None, "not found"),
    "empty.csv": ("", "empty"),
    "latin1.csv": ((HEADER + "0,Caf\xe9,\"['x']\",,,\n").encode("latin-1"), "not valid UTF-8"),
    "columns.csv": ("name,symptoms\nflu,fever\n", "missing column(s) ['disease', 'Symptom']"),
    "literal.csv": (HEADER + "0,Flu,\"['fever', \",,,\n", "row 1: field 'Symptom': not a Python list literal"),
    "listtype.csv": (HEADER + "0,Flu,\"['fever']\",,\"[1, 2]\",\n",
                     "row 1: field 'TestsAndProcedures': expected a list"),
    "nodisease.csv": (HEADER + "0,Flu,\"['fever']\",,,\n1, ,\"['x']\",,,\n", "row 2: field 'disease' is empty"),
    "extra.csv": (HEADER + "0,Flu,\"['fever']\",,,,surplus\n", "row 1: 7 values for 6 columns"),
    "header.csv": (HEADER, "no rows"),
    "json.jsonl": ('{"title": "a", "text": "b"}\n{"title": \n', "line 2: not valid JSON"),
    "list.jsonl": ('["a", "b"]\n', "line 1: expected an object"),
    "notext.jsonl": ('{"title": "a"}\n', "line 1: field 'text' must be a string (missing)"),
    "numbertext.jsonl": ('{"title": "a", "text": 3}\n', "line 1: field 'text' must be a string (int)"),
    "blanktext.jsonl": ('{"title": "a", "text": "  "}\n', "line 1: field 'text' is empty"),
    "data.pdf": ("%PDF", "unsupported knowledge file"),
    "notes.txt": ("   \n", "file is empty"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_naming_file_row_and_field(tmp_path, name):
    content, expected = BAD_INPUTS[name]
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError) as error:
        load_knowledge(str(path), cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)) and expected in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_bad_folders_and_specs(tmp_path):
    write(tmp_path / "docs" / "a.png", b"\x89PNG")
    write(tmp_path / "docs" / "empty.md", "")
    with pytest.raises(DataError, match="folder has no text"):
        read_entries(str(tmp_path / "docs"))
    write(tmp_path / "docs" / "bad.txt", b"caf\xe9")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 \(byte 3\)"):
        read_entries(str(tmp_path / "docs"))
    with pytest.raises(DataError, match="--knowledge is empty"):
        read_entries(" , ")


# ----------------------------------------------------------------------------- retrieval and cache

@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    """The first 24 diseases of format_dataset.csv, indexed in a private cache."""
    tmp = tmp_path_factory.mktemp("small-db")
    path = write(tmp / "db.csv", first_rows(24))
    return load_knowledge(str(path), cache_dir=tmp / "cache")


def test_finds_a_disease_from_its_symptom_list(small_db):
    hits = small_db.search_batch([", ".join(e.fields["symptoms"]) for e in small_db.entries], k=5)
    found = sum(entry in [e for e, _ in top] for entry, top in zip(small_db.entries, hits))
    assert found >= 0.95 * len(small_db)


def test_a_named_disease_comes_first(small_db):
    [(entry, _)] = small_db.search("What tests are there for a vocal cord polyp?", k=1)
    assert entry.title == "Vocal cord polyp"


def test_a_title_is_named_only_by_its_words_in_a_row(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"title": "Heart attack", "text": "chest pain"}\n'
                                       '{"title": "Panic attack", "text": "fear"}\n')
    kb = load_knowledge(str(path), cache_dir=tmp_path / "cache")
    named = kb.named_titles(knowledge.tokenize(["Sudden panic attacks with a racing heart"])[0])
    assert [kb.titles[span] for span in named] == [[1]]  # "attack ... heart" does not name "Heart attack"


def test_search_returns_k_entries_best_first(small_db):
    hits = small_db.search("I feel anxious and nervous all the time, with palpitations and chest tightness", k=3)
    assert len(hits) == 3 and hits[0][0].title == "Panic disorder"
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert len(small_db.search("", k=2)) == 2  # no words at all: MiniLM still ranks


def test_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path):
    path = write(tmp_path / "notes.jsonl", '{"title": "Gout", "text": "A hot, swollen big toe at night."}\n')
    cache = tmp_path / "cache"
    first = load_knowledge(str(path), cache_dir=cache)
    again = load_knowledge(str(path), cache_dir=cache)
    assert first.built and not again.built and again.cache_path == first.cache_path
    write(path, '{"title": "Asthma", "text": "Wheezing when it is cold."}\n')
    changed = load_knowledge(str(path), cache_dir=cache)
    assert changed.built and changed.cache_path != first.cache_path
    assert changed.search("wheezing", k=1)[0][0].title == "Asthma"
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.cache_path.name, changed.cache_path.name])


def test_the_encoder_is_minilm_in_onnx_runtime_equal_to_sentence_transformers():
    import numpy as np
    from sentence_transformers import SentenceTransformer

    encoder = knowledge.minilm_encoder()
    assert isinstance(encoder, SentenceTransformer) and encoder is knowledge.minilm_encoder()
    texts = ["sore throat", "throat pain", "broken leg", "my head is pounding on one side and light hurts my eyes"]
    vectors = knowledge.embed(texts)
    assert vectors.shape == (4, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    # embed runs the ONNX export in ONNX Runtime: the same vectors as sentence-transformers, in the given order
    assert np.abs(vectors - encoder.encode(texts, normalize_embeddings=True)).max() < 1e-5
    assert knowledge.embed([]).shape == (0, 384)


def test_a_damaged_onnx_encoder_is_exported_again(tmp_path, capsys):
    import numpy as np

    folder = tmp_path / knowledge.sha256_of(knowledge.minilm_dir() / "model.safetensors")[:16]
    write(folder / "all-MiniLM-L6-v2.onnx", b"cut short")
    session = knowledge.minilm_session(tmp_path)
    assert "damaged" in capsys.readouterr().err
    batch = knowledge.minilm_tokenizer()(["sore throat"], return_tensors="np")
    vectors = session.run(None, {name: batch[name].astype(np.int64) for name in knowledge.ONNX_INPUTS})[0]
    assert vectors.shape == (1, batch["input_ids"].shape[1], 384)
    assert [p.name for p in folder.iterdir()] == ["all-MiniLM-L6-v2.onnx"]  # no temporary left


@pytest.mark.slow
def test_the_whole_database_finds_each_disease_from_its_symptoms():
    kb = load_knowledge()  # the repository's cache (.cache/knowledge), as chat.py uses it
    entries = kb.entries[::8]
    hits = kb.search_batch([", ".join(e.fields["symptoms"]) for e in entries], k=5)
    found = sum(e in [h for h, _ in hs] for e, hs in zip(entries, hits))
    assert found >= 0.9 * len(entries)


# ----------------------------------------------------------------------------- prompt text

def disease(n, title, symptoms, tests=(), medications=()):
    fields = {"symptoms": list(symptoms), "description": "", "tests": list(tests), "medications": list(medications)}
    return Entry(f"format_dataset.csv#{n}", title, f"format_dataset.csv:{n + 1}", fields, title)


def test_format_context_and_sources_line():
    hits = [(disease(0, "Panic disorder", [f"s{i}" for i in range(8)], ["ECG", "Toxicology screen", "Psychotherapy"],
                     ["Lorazepam"]), 2.5),
            (Entry("notes.md#2", "notes", "docs/notes.md:2", {}, " ".join(["word"] * 100)), 1.0)]
    assert format_context(hits) == (
        "disease | symptoms | tests | medications\n"
        "Panic disorder | s0, s1, s2, s3, s4, s5, ... | ECG, Toxicology screen, ... | Lorazepam\n"
        "[notes] " + " ".join(["word"] * 80) + " ..."
    )
    assert sources_line(hits) == "Sources: format_dataset.csv#0 Panic disorder; notes.md#2 notes"
    assert format_context([]) == "" and sources_line([]) == ""


# ----------------------------------------------------------------------------- the original pipeline

class FakeModel:
    def __init__(self, keywords="Panic disorder, Vocal cord polyp"):
        self.prompts, self.keywords = [], keywords

    def __call__(self, prompt):
        self.prompts.append(prompt)
        return self.keywords if len(self.prompts) == 1 else f"answer {len(self.prompts)}"


def test_original_prompts_are_verbatim_and_a_turn_takes_six_calls():
    chunks = original_chunks(DISEASE_CSV)
    assert len(chunks) == 133  # 796 rows, 6 a chunk
    assert chunks[0].startswith("{'idx': 0, 'disease': 'Panic disorder', 'Symptom': 'Anxiety and nervousness', ")
    assert "'Imipramine', 'Desvenlafaxine (Pristiq)', 'Clomipramine', 'Acamprosate (Campral)'\n\n'idx': 1, " \
           "'disease': 'Vocal cord polyp', " in chunks[0]
    assert chunks[0].endswith("}") and "[" not in chunks[0] and '"' not in chunks[0]
    model = FakeModel()
    turn = original_answer("I get panic attacks.", model, chunks)
    assert turn.model_calls == len(model.prompts) == 6
    assert model.prompts[0] == (
        "A question is provided below. Given the question, extract keywords from the text. Focus on extracting the "
        "keywords that we can use to best lookup answers to the question. \n---------------------\n"
        "I get panic attacks.\n---------------------\nProvide keywords in the following comma-separated format.\n"
        "Keywords: "
    )
    assert turn.keywords == ["Panic disorder", "Vocal cord polyp"]
    assert turn.chunks[0] == chunks[0]  # the only chunk with both keywords
    assert model.prompts[1] == (
        chunks[0] + "\n---------------------\nBased on the diseases and corresponding symptoms in the Table above, "
        "answer the question: I get panic attacks.\nDisease name and corresponding symptoms: "
    )
    assert model.prompts[5] == (
        "The original question is as follows: I get panic attacks.\nWe have provided existing answers:\n"
        "------------\nanswer 2\n\nanswer 3\n\nanswer 4\n\nanswer 5\n------------\nThe best one answer: "
    )
    assert turn.answer == "answer 6"


def test_original_ranking_and_short_tables():
    # keywords keep the model's whitespace (the original's strip() is a no-op) and ties sort by text, descending
    assert knowledge.original_keywords("fever, cough\n=== notes") == ["fever", "cough\n"]
    assert knowledge.original_ranked_chunks(["b"], ["a b", "c", "b d", "e"]) == ["b d", "a b", "e", "c"]
    one = FakeModel()
    turn = original_answer("q", one, ["only chunk"])
    assert (turn.model_calls, turn.answer) == (2, "answer 2")  # no best-answer call for a single answer
    none = FakeModel()
    assert original_answer("q", none, []).model_calls == 1


def test_original_mode_reads_csv_only(tmp_path):
    with pytest.raises(DataError, match="original reads a disease CSV only"):
        original_chunks(write(tmp_path / "notes.jsonl", '{"title": "a", "text": "b"}\n'))


# ----------------------------------------------------------------------------- patients' own words

LAY_DISEASES = ("Burn", "Urinary tract infection", "Cystitis", "Gastroesophageal reflux disease (GERD)", "Heart attack",
                "Conjunctivitis", "Migraine", "Gout", "Asthma", "Strep throat", "Kidney stone", "Appendicitis",
                "Common cold", "Flu", "Eczema", "Scabies", "Diabetes", "Hypothyroidism", "Pyelonephritis")


@pytest.fixture(scope="module")
def lay_db(tmp_path_factory):
    """The first 24 diseases of format_dataset.csv and the LAY_DISEASES, indexed in a private cache."""
    with open(DISEASE_CSV, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + rows[1:25] + [r for r in rows[25:] if knowledge.decode_escapes(r[1]) in LAY_DISEASES]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(keep)
    tmp = tmp_path_factory.mktemp("lay-db")
    return load_knowledge(str(write(tmp / "db.csv", out.getvalue())), cache_dir=tmp / "cache")


def test_a_burning_feeling_when_passing_urine_finds_the_infection_not_burn(lay_db):
    message = "burning sensation when passing urine, its cloudy and smells strong, no fever"
    [(first, _)] = lay_db.search(message, k=1)
    assert first.title in ("Urinary tract infection", "Cystitis")
    assert len(lay_db.named_symptoms(set(knowledge.tokenize([message])[0]))) < knowledge.LAY_NAMED_SYMPTOMS


@pytest.mark.parametrize("message, accepted", [
    ("My eye is pink and gunky, the lashes were stuck together when I woke up.", {"Conjunctivitis"}),
    ("I get a burning feeling behind my breastbone after eating and a sour taste comes up, worse when I lie down.",
     {"Gastroesophageal reflux disease (GERD)"}),
    ("im always thirsty and peeing loads, lost weight without trying", {"Diabetes"}),
])
def test_a_lay_message_finds_its_disease_among_the_first_three(lay_db, message, accepted):
    assert {entry.title for entry, _ in lay_db.search(message, k=3)} & accepted


def test_the_lay_path_moves_the_weights_only_when_few_symptom_names_are_named(lay_db):
    clinical = ("Doctor, I have painful urination, frequent urination, suprapubic pain, pelvic pain, retention of urine "
                "and blood in urine.")
    assert len(lay_db.named_symptoms(set(knowledge.tokenize([clinical])[0]))) >= knowledge.LAY_NAMED_SYMPTOMS
    assert lay_db.weights_for(clinical) == knowledge.WEIGHTS
    lay = lay_db.weights_for("it stings when I wee")
    assert lay["dense"] > knowledge.WEIGHTS["dense"] and lay["words"] < knowledge.WEIGHTS["words"]


# ----------------------------------------------------------------------------- the query map

def test_fit_query_map_pulls_questions_to_their_entries_and_strength_holds_it_near_identity():
    import numpy as np

    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    entries = unit(rng.normal(size=(20, 16)))
    answers = rng.integers(0, 20, 300)
    mixing = np.eye(16) + 0.8 * rng.normal(size=(16, 16))  # questions worded unlike their entries
    questions = unit(entries[answers] @ mixing + 0.1 * rng.normal(size=(300, 16)))
    top1 = lambda m: float(np.mean(np.argmax(unit(questions @ m) @ entries.T, axis=1) == answers))  # noqa: E731
    fitted = tune_knowledge.fit_query_map(questions, answers, [entries], strength=1e-3, temperature=0.05)
    assert top1(fitted) > top1(np.eye(16)) + 0.2
    held = tune_knowledge.fit_query_map(questions, answers, [entries], strength=1e4, temperature=0.05)
    assert np.abs(held - np.eye(16)).max() < 1e-2


def test_the_query_map_applies_to_disease_tables_only(tmp_path):
    table = load_knowledge(str(write(tmp_path / "db.csv", first_rows(5))), cache_dir=tmp_path / "cache")
    assert table.query_map is not None and table.query_map.shape == (384, 384)
    notes = load_knowledge(str(write(tmp_path / "notes.jsonl", '{"title": "Gout", "text": "A red big toe."}\n')),
                           cache_dir=tmp_path / "cache")
    assert notes.query_map is None


@pytest.mark.parametrize("content", [b"not a numpy file", None])
def test_a_bad_query_map_is_one_line_naming_the_file(tmp_path, content):
    import numpy as np

    bad = tmp_path / "map.npy"
    bad.write_bytes(content) if content else np.save(bad, np.eye(3))
    with pytest.raises(DataError) as error:
        load_knowledge(str(write(tmp_path / "db.csv", first_rows(3))), cache_dir=tmp_path / "cache", query_map=bad)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_the_query_map_brings_lay_messages_to_their_disease():
    """On the lay tuning messages (the map never saw them: it is fitted on GenMedGPT questions), more find an
    accepted disease among the first five through the map than without it."""
    records = tune_knowledge.tuning_part(ROOT / "data" / "lay_questions.json")
    messages = [r["input"] for r in records]

    def found(kb):
        hits = kb.search_batch(messages, k=5)
        return sum(bool({e.title for e, _ in found} & set(r["accepted"])) for r, found in zip(records, hits))

    assert found(load_knowledge()) >= found(load_knowledge(query_map=None)) + 0.05 * len(records)


# ----------------------------------------------------------------------------- the diagnosis-intent classifier

def test_fit_intent_learns_which_messages_ask_for_a_diagnosis_and_choose_intent_writes_it(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    asks = vectors @ direction > 0.5  # imbalanced, as diagnosis questions outnumber the others
    values = tune_knowledge.fit_intent(vectors, asks, c=10.0)
    assert values.shape == (17,) and values.dtype == np.float32
    assert np.mean((knowledge.intent_probability(values[:-1], values[-1], vectors) >= 0.5) == asks) > 0.95
    out = tmp_path / "intent.npy"
    report = tune_knowledge.choose_intent(vectors, asks, np.ones(200, dtype=bool), out)
    assert report["chosen"]["balanced_accuracy"] > 0.9 and np.load(out).shape == (17,)


def test_the_intent_classifier_applies_to_disease_tables_only(tmp_path):
    table = load_knowledge(str(write(tmp_path / "db.csv", first_rows(5))), cache_dir=tmp_path / "cache")
    weights, bias = table.intent
    assert weights.shape == (384,) and isinstance(bias, float)
    notes = load_knowledge(str(write(tmp_path / "notes.jsonl", '{"title": "Gout", "text": "A red big toe."}\n')),
                           cache_dir=tmp_path / "cache")
    assert notes.intent is None and notes.retrieve("what does a statin do?", k=1).intent is None


@pytest.mark.parametrize("content", [b"not a numpy file", None])
def test_a_bad_intent_file_is_one_line_naming_the_file(tmp_path, content):
    import numpy as np

    bad = tmp_path / "intent.npy"
    bad.write_bytes(content) if content else np.save(bad, np.ones(384))  # the bias is missing
    with pytest.raises(DataError) as error:
        load_knowledge(str(write(tmp_path / "db.csv", first_rows(3))), cache_dir=tmp_path / "cache", intent=bad)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- when not to ground

@pytest.mark.parametrize("message", ["Is it safe to take ibuprofen with my sertraline?",
                                     "How often should I get a flu vaccine?",
                                     "What does an HbA1c of 44 mean?"])
def test_a_question_that_describes_no_symptom_is_not_grounded(lay_db, message):
    retrieval = lay_db.retrieve(message)
    assert len(retrieval.hits) == knowledge.DEFAULT_K  # found, for /sources ...
    assert not retrieval.grounded and retrieval.used == []  # ... but left out of the prompt
    assert "not grounded" in retrieval.reason()


def test_a_question_about_a_test_that_names_body_parts_is_not_grounded():
    """Symptom-like words ("heart", "chest") but a test result: closer to the database's tests than its symptoms."""
    retrieval = load_knowledge().retrieve("My chest CT scan report says there is a small nodule in my lung. What now?")
    assert retrieval.describes_symptoms and not retrieval.more_symptoms_than_care and not retrieval.grounded
    assert "about a test or a medicine" in retrieval.reason()


def test_a_question_about_care_that_names_a_symptom_is_left_out_by_the_intent_classifier():
    """It describes a symptom (hard to swallow) and names no test or medicine, so evidence and margin would ground
    it; it asks how to take tablets, not what is wrong."""
    message = "can I crush my tablets, I find them hard to swallow"
    retrieval = load_knowledge().retrieve(message)
    assert retrieval.describes_symptoms and retrieval.more_symptoms_than_care
    assert not retrieval.asks_what_is_wrong and not retrieval.grounded and retrieval.used == []
    assert "asks about care" in retrieval.reason() and "diagnosis intent" in retrieval.reason()
    assert load_knowledge(intent=None).retrieve(message).grounded


@pytest.mark.parametrize("message", ["My throat is really sore, it hurts to swallow and there are white patches",
                                     "i worry about everything all the time, cant switch off and cant sleep"])
def test_a_patient_asking_what_is_wrong_passes_the_intent_classifier(message):
    retrieval = load_knowledge().retrieve(message)
    assert retrieval.intent >= knowledge.INTENT_MIN and retrieval.grounded


def test_a_message_that_describes_symptoms_is_grounded(lay_db):
    retrieval = lay_db.retrieve("My big toe is red, hot and swollen and it hurts at night")
    assert retrieval.grounded and retrieval.used == retrieval.hits
    assert retrieval.evidence >= knowledge.GROUND_MIN_EVIDENCE


def test_passages_without_symptom_names_always_ground(tmp_path):
    path = write(tmp_path / "notes.jsonl", '{"title": "Ibuprofen", "text": "Take with food."}\n')
    kb = load_knowledge(str(path), cache_dir=tmp_path / "cache")
    retrieval = kb.retrieve("Is it safe to take ibuprofen with my sertraline?", k=1)
    assert retrieval.evidence is None and retrieval.grounded


def test_a_large_base_searches_through_faiss_with_the_brute_force_answer(tmp_path):
    """From faiss_min_entries on, dense search goes through an HNSW index; here (a few entries) it must rank as
    brute force does. The threshold is part of the cache key: the two bases are two caches."""
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in [
        ("Gout", "A hot, red, swollen big toe that hurts at night."), ("Migraine", "A throbbing headache with nausea."),
        ("Asthma", "Wheezing and shortness of breath at night."), ("Eczema", "Itchy, dry, red patches of skin.")]))
    plain = knowledge.load_knowledge(str(notes), cache_dir=tmp_path / "cache")
    indexed = knowledge.load_knowledge(str(notes), cache_dir=tmp_path / "cache", faiss_min_entries=1)
    assert plain.dense_index is None and indexed.dense_index is not None
    assert plain.cache_path != indexed.cache_path
    question = "my big toe is swollen and red"
    assert [e.title for e, _ in indexed.search(question, 1)] == [e.title for e, _ in plain.search(question, 1)] == ["Gout"]
