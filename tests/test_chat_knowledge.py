"""chat.py and eval.py with --knowledge: grounded prompts, sources, /sources, KV-cache reuse, the original pipeline."""
import json

import pytest
from conftest import Terminal, tiny_args

import chat
import knowledge
import prompts
import utils

GREEDY = {"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": 10}
CSV_HEADER = "idx,disease,Symptom,reason,TestsAndProcedures,commonMedications\n"


class FakeKnowledge:
    """A knowledge base that always retrieves the same entry and counts the queries it got."""

    def __init__(self):
        self.queries = []
        self.entry = knowledge.Entry(id="kb.csv#1", title="Gout", source="kb.csv:1",
                                     fields={"symptoms": ["toe pain"], "tests": ["uric acid"], "medications": ["colchicine"],
                                             "description": ""}, text="Gout: toe pain")

    def retrieve(self, query, k=5):
        self.queries.append(query)
        return knowledge.Retrieval([(self.entry, 1.0)])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return utils.load_model_and_tokenizer(tiny_model_dir)


@pytest.fixture()
def disease_csv(tmp_path):
    path = tmp_path / "kb.csv"
    path.write_text(CSV_HEADER
                    + "0,Gout,\"['Foot pain', 'Toe swelling']\",uric acid,\"['Uric acid test']\",\"['Colchicine']\"\n"
                    + "1,Asthma,\"['Wheezing', 'Shortness of breath']\",airways,\"['Spirometry']\",\"['Albuterol']\"\n"
                    + "2,Migraine,\"['Headache', 'Nausea']\",brain,\"['Neurological exam']\",\"['Sumatriptan']\"\n")
    return path


def test_grounded_prompt_carries_the_entries_with_the_newest_message_only(tiny):
    model, tokenizer = tiny
    kb = FakeKnowledge()
    c = chat.Chat(model, tokenizer, "alpaca", GREEDY, knowledge=kb)
    encoded = []
    encode = c.encode
    c.encode = lambda text: encoded.append(text) or encode(text)
    c.respond("My big toe hurts at night.")
    c.respond("It is red and swollen.")
    assert kb.queries == ["My big toe hurts at night.", "It is red and swollen."]
    newest = [p for p in encoded if "It is red and swollen." in p][0]
    assert newest.count(prompts.KNOWLEDGE_HEADER) == 1  # the first message's entries are not repeated
    assert newest.index(prompts.KNOWLEDGE_HEADER) > newest.index("It is red and swollen.")
    assert "Gout | toe pain | uric acid | colchicine" in newest
    assert c.turns[0] == (prompts.PATIENT, "My big toe hurts at night.")  # the history keeps what the patient said
    assert c.last_hits[0][0].title == "Gout"


def test_kv_cache_reuse_with_knowledge_gives_the_same_answers(tiny):
    model, tokenizer = tiny
    questions = ["My big toe hurts at night.", "It is red and swollen.", "What should I take?"]
    runs = {reuse: chat.Chat(model, tokenizer, "chatdoctor", GREEDY, knowledge=FakeKnowledge(),
                             reuse_cache=reuse).respond_all(questions) for reuse in (True, False)}
    assert runs[True] == runs[False] and all(runs[True])


def test_kv_cache_serves_the_history_before_the_newest_grounded_message(tiny):
    model, tokenizer = tiny
    c = chat.Chat(model, tokenizer, "chatdoctor", GREEDY, knowledge=FakeKnowledge())
    c.respond("My big toe hurts at night.")
    prefix = c.encode(prompts.next_turn_prefix(c.turns, "chatdoctor"))
    assert c.cached_ids == prefix  # the next turn only encodes its message and its entries
    assert 0 <= c.stats["retrieval_s"] <= c.stats["first_token_s"]  # what bench_chat reports per turn


def test_original_pipeline_prompts_and_calls(disease_csv):
    """The released pipeline: keyword prompt, 4 chunk answers, best-answer call (6 calls), prompts verbatim."""
    prompts = []

    def fake_generate(prompt):
        prompts.append(prompt)
        return "Gout, foot pain" if prompt.startswith("A question is provided below.") else f"answer {len(prompts)}"

    chunks = knowledge.original_chunks(disease_csv)
    turn = knowledge.original_answer("My toe hurts", fake_generate, chunks)
    assert prompts[0] == knowledge.ORIGINAL_KEYWORD_PROMPT.format("My toe hurts")
    assert "Based on the diseases and corresponding symptoms in the Table above, answer the question: My toe hurts" \
        in prompts[1]
    assert turn.model_calls == len(prompts) == 1 + len(turn.chunks) + (1 if len(turn.chunks) > 1 else 0)
    assert turn.answer == f"answer {len(prompts)}"


def test_one_shot_answer_is_followed_by_its_sources(tiny_model_dir, disease_csv, capsys):
    assert chat.main(tiny_args(tiny_model_dir, "--knowledge", str(disease_csv), "--knowledge_k", "2",
                               "--prompt", "My big toe hurts and is swollen")) == 0
    out, err = capsys.readouterr()
    lines = out.rstrip("\n").split("\n")
    assert lines[-1].startswith("Sources: kb.csv#") and "Gout" in lines[-1] and lines[-1].count(";") == 1
    assert "knowledge: 3 entries" in err and "Traceback" not in err


def test_a_question_about_medicines_is_answered_without_entries_and_says_so(tiny_model_dir, disease_csv, monkeypatch,
                                                                              capsys):
    import io

    piped = io.TextIOWrapper(io.BytesIO(b"Can I drink alcohol while taking metronidazole?\n/sources\n/exit\n"))
    monkeypatch.setattr("sys.stdin", piped)
    assert chat.main(tiny_args(tiny_model_dir, "--knowledge", str(disease_csv), "--knowledge_k", "2")) == 0
    out, _ = capsys.readouterr()
    assert prompts.NO_SOURCES in out
    assert "1. kb.csv#" in out and "2. kb.csv#" in out and "not grounded: the message does not describe symptoms" in out


def test_piped_sources_command_lists_the_last_retrieval(tiny_model_dir, disease_csv, monkeypatch, capsys):
    import io

    piped = io.TextIOWrapper(io.BytesIO(b"I keep wheezing and I am short of breath\n/sources\n/bogus\n/exit\n"))
    monkeypatch.setattr("sys.stdin", piped)
    assert chat.main(tiny_args(tiny_model_dir, "--knowledge", str(disease_csv), "--knowledge_k", "2")) == 0
    out, err = capsys.readouterr()
    assert out.count("Sources: ") == 1  # one answer: the commands are not patient messages
    assert "1. kb.csv#" in out and "2. kb.csv#" in out and "score" in out
    assert "unknown command /bogus" in err


def test_bad_knowledge_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,notes\nGout,toe\n")
    with pytest.raises(SystemExit) as e:
        chat.main(tiny_args(tiny_model_dir, "--knowledge", str(bad), "--prompt", "hi"))
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and "bad.csv" in err[-1]


def test_terminal_sources_command(tiny_model_dir, disease_csv):
    t = Terminal(*tiny_args(tiny_model_dir, "--knowledge", str(disease_csv), "--knowledge_k", "2"))
    t.expect("Patient: ")
    t.type("I keep wheezing and I am short of breath\r")
    t.expect("Sources: ")
    t.expect("Patient: ")
    t.type("/sources\r")
    listing = t.expect("Patient: ")
    assert "1. kb.csv#" in listing and "score" in listing and "2. kb.csv#" in listing
    t.type("/exit\r")
    assert t.wait() == 0


def test_eval_with_knowledge_reports_retrieval_recall(tiny_model_dir, disease_csv, tmp_path):
    import eval as ev

    records = [{"instruction": utils.CHATDOCTOR_INSTRUCTION, "input": "I keep wheezing and I am short of breath",
                "output": "This could be asthma."},
               {"instruction": utils.CHATDOCTOR_INSTRUCTION, "input": "Terrible headache with nausea",
                "output": "It may be a migraine."}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    metrics = ev.main(["--model_path", str(tiny_model_dir), "--knowledge", str(disease_csv), "--knowledge_k", "1",
                       "--data_path", str(data), "--disease_csv", str(disease_csv), "--max_new_tokens", "4",
                       "--output_dir", str(tmp_path / "out")])
    m = metrics[tiny_model_dir.name]
    assert m["retrieval_recall"] == 1.0 and m["retrieval_k"] == 1 and m["model_calls_per_message"] == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["retrieved"][0].split(" ", 1)[1] for r in rows] == ["Asthma", "Migraine"]


def test_eval_runs_the_original_pipeline_as_released(tiny, disease_csv):
    """eval.py batches the pipeline's calls phase by phase; the answers and call counts are those of
    knowledge.original_answer run one call at a time with the same greedy model."""
    import torch

    import eval as ev

    model, tokenizer = tiny
    records = [{"instruction": "i", "input": "My big toe hurts", "output": "x"},
               {"instruction": "i", "input": "I keep wheezing", "output": "y"}]
    answers, calls = ev.original_pipeline_answers(model, tokenizer, records, disease_csv, 6, 1.1, "original",
                                                  batch_size=1)

    def complete(prompt):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, repetition_penalty=1.1,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    chunks = knowledge.original_chunks(disease_csv)
    turns = [knowledge.original_answer(r["input"], complete, chunks) for r in records]
    assert answers == [prompts.visible_answer(t.answer + "\n")[0] for t in turns]
    assert calls == [t.model_calls for t in turns] and all(c <= 6 for c in calls)


def demo_question():
    """The question `make demo` ends with (Makefile's DEMO_QUESTION)."""
    makefile = (utils.ROOT / "Makefile").read_text(encoding="utf-8")
    return next(line.split("?=", 1)[1].strip() for line in makefile.splitlines() if line.startswith("DEMO_QUESTION"))


@pytest.mark.slow
def test_the_demo_question_is_grounded_in_the_database_and_names_its_sources(tiny_model_dir, capsys):
    """make demo's second answer: the repository's disease database grounds the question (sore throat, fever,
    swollen neck glands), with throat or neck diseases among the entries, and the answer ends with their Sources."""
    question = demo_question()
    retrieval = knowledge.load_knowledge().retrieve(question)
    assert retrieval.grounded and len(retrieval.used) == knowledge.DEFAULT_K
    throat_or_neck = {"Strep throat", "Tonsillitis", "Pharyngitis", "Peritonsillar abscess", "Lymphadenitis", "Mumps",
                      "Mononucleosis", "Acute sinusitis", "Common cold", "Flu"}
    assert {entry.title for entry, _ in retrieval.used} & throat_or_neck
    assert chat.main(tiny_args(tiny_model_dir, "--knowledge", str(knowledge.DEFAULT_KNOWLEDGE),
                               "--prompt", question)) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[-1] == prompts.sources_line(retrieval.used)
