"""clean.py: each cleaning rule, format preservation, determinism, bad input, the report, and the trainer's reader
on the output. The names and spelling rules need Debian's hunspell-en-us and hunspell-en-med (`make dictionaries`,
part of `make test`); without them those tests skip, as the browser tests do without Chromium."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import clean
import utils

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_clean_names  # noqa: E402

HAVE_DICTIONARIES = all((clean.HUNSPELL_DIR / name).is_file() for name in (f"{clean.EN_US}.dic", clean.EN_MED))
needs_dictionaries = pytest.mark.skipif(not HAVE_DICTIONARIES, reason="hunspell-en-us / hunspell-en-med not "
                                        "installed (make dictionaries)")
HCM = "If you are a doctor, please answer the medical questions based on the patient's description."
QUESTION = "Hi doctor, I am 32 years old and I have had a dull pain in my lower back for two weeks. What is it?"
ANSWER = ("Hi, Thanks for query. Your symptoms suggest a muscular strain. Take rest and apply warm compresses. "
          "If it persists, get an X-ray done.")


@pytest.fixture(scope="module")
def dictionaries():
    if not HAVE_DICTIONARIES:
        pytest.skip("hunspell dictionaries not installed (make dictionaries)")
    return clean.load_dictionaries(clean.HUNSPELL_DIR)


@pytest.fixture(scope="module")
def finder(dictionaries):
    return clean.NameFinder(dictionaries)


def record(question=QUESTION, answer=ANSWER, **extra):
    return {"instruction": HCM, "input": question, "output": answer, **extra}


def write_json(path, records, indent=4):
    path.write_text(json.dumps(records, indent=indent), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run(tmp_path, name, records, *flags, jsonl=False):
    """clean.py in process on records; (output records, report)."""
    src = (write_jsonl if jsonl else write_json)(tmp_path / f"{name}-in.{'jsonl' if jsonl else 'json'}", records)
    out = tmp_path / f"{name}-out.{'jsonl' if jsonl else 'json'}"
    report = clean.main([str(src), str(out), "--quiet", *flags])
    text = out.read_text(encoding="utf-8")
    cleaned = [json.loads(line) for line in text.splitlines() if line.strip()] if jsonl else json.loads(text)
    return cleaned, report


def redact(finder, text):
    return clean.redact_names(text, finder.find(text), clean.NAME_PLACEHOLDER)


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("text, expected", [
    ("Hi John, thanks for your query. Take rest. Regards, Dr. Jane Smith",
     "Hi, thanks for your query. Take rest. Regards"),
    ("Hello Mrs. Smith. Your thyroid tests are normal.", "Hello. Your thyroid tests are normal."),
    ("Hi, Thanks for query. Please consult Dr. Rahul Sharma soon. Thanks, Dr. Rahul",
     "Hi, Thanks for query. Please consult the doctor soon. Thanks"),
    ("Hello doctor, my name is Sunita and my son Aarav has fever.",
     "Hello doctor, my name is [NAME] and my son [NAME] has fever."),
    ("hi john, i have fever since 2 days.", "hi, i have fever since 2 days."),
    ("Regards Dr. K. Gupta, Dermatologist", "Regards, Dermatologist"),
])
def test_names_removed_from_greetings_sign_offs_and_text(finder, text, expected):
    assert redact(finder, text) == expected


@pytest.mark.parametrize("text", [
    "Parkinson's disease is treatable with levodopa.",
    "Your MRI suggests Crohn's disease of the terminal ileum.",
    "Graves' disease causes an overactive thyroid.",
    "Hi, Bell's palsy usually recovers in 3 to 6 months.",
    "My daughter has Down syndrome and a heart murmur.",
    "Hashimoto's thyroiditis is autoimmune; Alzheimer's is not.",
    "Cushing's syndrome is possible. Addison's disease is the opposite problem.",
    "In May my mother was diagnosed with Graves disease and Wilson disease.",
    "Hi Dr., I have a headache. Dr. I am worried. Hello Doctor, help. Dear Sir, please advise.",
    "I took Allegra for my allergy. Will this rash go away? Hope you can help.",
])
def test_eponyms_and_non_names_survive(finder, text):
    assert finder.find(text) == []
    assert redact(finder, text) == text


def test_a_titled_eponym_is_a_person(finder):
    assert redact(finder, "Hello Mr. Parkinson, this is not Parkinson's disease.") == \
        "Hello, this is not Parkinson's disease."


def test_name_removal_precision_and_recall_on_the_labelled_set(finder):
    """The labelled set of docs/RESULTS.md: a fall below these floors is a regression of the name rules."""
    records = [json.loads(line) for line in bench_clean_names.LABELLED.read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 100
    result = bench_clean_names.score(records, finder)
    assert result["precision"] >= 0.97 and result["recall"] >= 0.95, result
    assert result["eponyms_kept"] == result["eponyms"] > 10


# ----------------------------------------------------------------------------- contacts, sites, issue 58

def test_contacts_replaced():
    text, counts = clean.replace_contacts("Mail dr.smith@gmail.com, call +91 98765 43210 or 9876543210, see "
                                          "www.example.com/a. TSH 4.5, platelets 150000, BP 120/80.")
    assert text == ("Mail [EMAIL], call [PHONE] or [PHONE], see [URL]. TSH 4.5, platelets 150000, BP 120/80.")
    assert counts == {"email": 1, "phone": 2, "url": 1}


@pytest.mark.parametrize("text, expected", [
    ("Hi and welcome to Chat Doctor. Thank you for your query. I am Chat Doctor.. You have an infection.",
     "Hi. Thank you for your query. You have an infection."),
    ("Hello, Welcome to iCliniq. I have gone through your query.", "Hello. I have gone through your query."),
    ("Hi, Thanks for asking Chat Doctor. Take rest.", "Hi, Thanks for asking us. Take rest."),
    ("Thank you for your query on HealthcareMagic. Take rest.", "Thank you for your query. Take rest."),
    ("Take rest. Regards, Dr. Chat Doctor", "Take rest."),
])
def test_site_names_in_greetings_and_sign_offs_normalised(text, expected):
    assert clean.normalise_sites(text, keep_chatdoctor=True)[0] == expected


ISSUE_58 = [
    "Secondly, a hemolytic condition also can be a possibility but serum LDH (lactic acid dehy ChatDoctor.",
    "Isoniazid-induced peripheral neuropathy, which occurs in a few patients who are on anti-tubercular  ChatDoctor.",
    "1.Control sugars if you are diabetic.2. ChatDoctor. 3.Keep your private parts dry.",
    "It is a disease-modifying  ChatDoctor.",
]


def test_chat_doctor_inside_a_sentence_drops_the_record_and_is_sampled(tmp_path):
    records = [record(answer="Hi, Thanks for asking Chat Doctor. " + ANSWER)] + \
        [record(question=QUESTION + f" Case {i}.", answer=f"Hello. {text} Take care.")
         for i, text in enumerate(ISSUE_58)]
    cleaned, report = run(tmp_path, "issue58", records, "--rules", "sites,chatdoctor")
    assert len(cleaned) == 1 and "Chat Doctor" not in cleaned[0]["output"]
    assert report["rules"]["chatdoctor"]["dropped"] == 4
    assert "dehy ChatDoctor" in report["rules"]["chatdoctor"]["examples"][0]["detail"]
    dropped = [json.loads(line) for line in Path(report["dropped_file"]).read_text().splitlines()]
    assert [d["record"] for d in dropped] == [1, 2, 3, 4] and {d["reason"] for d in dropped} == {"chatdoctor"}
    assert dropped[0]["original"] == records[1]


# ----------------------------------------------------------------------------- drops

def test_exact_and_near_duplicates_dropped_keeping_the_first(tmp_path):
    other = record(question="Hello doctor, my child has a rash on both legs since yesterday and mild fever.",
                   answer="Hi, this is likely a viral rash. Give paracetamol for fever and watch for spreading.")
    long = record(answer=ANSWER + " Avoid lifting heavy weights for two weeks and sleep on a firm mattress. "
                  "Paracetamol or ibuprofen after food can ease the pain. See an orthopaedician if it spreads to the "
                  "legs or you feel numbness.")
    near = dict(long, output=long["output"].replace("two weeks", "three weeks").upper())
    cleaned, report = run(tmp_path, "dedup", [long, other, dict(long), near], "--rules", "dedup")
    assert cleaned == [long, other]
    assert report["rules"]["dedup"]["changes"] == {"exact": 1, "near": 1}
    assert report["rules"]["dedup"]["examples"][1]["detail"] == "near duplicate of record 0"


def test_non_english_truncated_and_empty_records_dropped(tmp_path):
    records = [
        record(),
        record(question="mujhe do din se bukhar hai aur sar mein dard bhi hai kya karu doctor sahab batao"),
        record(question="Hola doctor, tengo dolor de cabeza y fiebre desde hace dos días, qué puedo tomar?"),
        record(question="Доктор, у меня болит голова и температура уже два дня."),
        record(answer="Hi, Thanks for query. Your symptoms suggest a muscular strain and the"),
        record(answer="Hi, Thanks for query. Take paracetamol,"),
        record(question=""),
        record(answer="Ok."),
    ]
    cleaned, report = run(tmp_path, "drops", records, "--rules", "empty,truncated,english")
    assert cleaned == [record()]
    assert report["dropped_by_reason"] == {"english": 3, "truncated": 2, "empty": 2}


# ----------------------------------------------------------------------------- spelling

@needs_dictionaries
def test_spelling_fixed_only_when_unambiguous(dictionaries):
    text = ("I have stomach pain becuase of dizzyness. I recieved paracetamol and amoxicillin from "
            "Crocin shop, my tounge is dry and the medicin did not help.")
    fixed, changes = clean.correct_spelling(text, dictionaries, protected=set())
    assert changes == [("becuase", "because"), ("dizzyness", "dizziness"), ("medicin", "medicine")]
    # "recieved": received or relieved; "tounge": the one candidate ("lounge") changes the first letter
    assert "recieved" in fixed and "tounge" in fixed and "amoxicillin" in fixed and "Crocin" in fixed


# ----------------------------------------------------------------------------- files, formats, switches

@needs_dictionaries
def test_hcm_json_keeps_its_format_fields_and_order(tmp_path):
    first = record(answer="Hi Maria, Thanks for asking Chat Doctor. " + ANSWER + " Regards, Dr. Jane Smith",
                   source="hcm-17")
    cleaned, report = run(tmp_path, "hcm", [first, record(question="Hello doctor, my child has had a rash for a "
                                                                   "week and it itches at night. What to do?")])
    src_text = (tmp_path / "hcm-out.json").read_text(encoding="utf-8")
    assert src_text == json.dumps(cleaned, indent=4) + "\n"  # the input's layout: indent 4, ASCII escapes
    assert list(cleaned[0]) == ["instruction", "input", "output", "source"] and cleaned[0]["source"] == "hcm-17"
    assert cleaned[0]["output"] == "Hi, Thanks for asking us. " + ANSWER + " Regards"
    assert report["format"] == "json" and report["shape"] == "alpaca" and report["written"] == 2
    assert utils.load_records(tmp_path / "hcm-out.json")[0]["output"] == cleaned[0]["output"]  # train.py's reader


@needs_dictionaries
@pytest.mark.parametrize("shape", ["alpaca", "icliniq"])
def test_icliniq_jsonl_in_both_shapes(tmp_path, shape):
    answer = "Hello, Welcome to iCliniq. I have gone through your query. " + ANSWER[22:] + " Regards, Dr. Ilir Sharka"
    if shape == "icliniq":
        rows = [{"input": QUESTION, "answer_icliniq": answer, "answer_chatgpt": "Hi John, rest well. " + ANSWER,
                 "answer_chatdoctor": ANSWER}]
    else:
        rows = [record(answer=answer)]
    cleaned, report = run(tmp_path, shape, rows, jsonl=True)
    assert report["format"] == "jsonl" and report["shape"] == shape and list(cleaned[0]) == list(rows[0])
    doctor = cleaned[0]["answer_icliniq" if shape == "icliniq" else "output"]
    assert doctor.startswith("Hello. I have gone through your query.") and doctor.endswith("Regards")
    if shape == "icliniq":
        assert cleaned[0]["answer_chatgpt"].startswith("Hi, rest well.")
    assert utils.load_records((tmp_path / f"{shape}-out.jsonl"))[0]["output"] == doctor


@needs_dictionaries
def test_rules_switch_off(tmp_path):
    named = record(answer=ANSWER + " Regards, Dr. Jane Smith")
    kept, report = run(tmp_path, "off", [named, named], "--no-names", "--no-dedup")
    assert [r["output"] for r in kept] == [named["output"]] * 2 and "names" not in report["rules"]
    only, report = run(tmp_path, "only", [named, named], "--rules", "names")
    assert len(only) == 2 and only[0]["output"].endswith("Regards") and report["rules_run"] == ["names"]


@needs_dictionaries
def test_same_input_same_output(tmp_path):
    records = [record(question=QUESTION + f" Day {i % 7}.", answer=f"Hi Priya, {ANSWER} Regards, Dr. Rahul")
               for i in range(30)] + [record(question="mujhe bukhar hai aur dard hai kya karu doctor sahab batao ji")]
    outputs = []
    for attempt in range(2):
        run(tmp_path, f"det{attempt}", records)
        outputs.append(((tmp_path / f"det{attempt}-out.json").read_bytes(),
                        (tmp_path / f"det{attempt}-out.dropped.jsonl").read_bytes()))
    assert outputs[0] == outputs[1] and outputs[0][1]


@needs_dictionaries
def test_report_json_summary_and_chart(tmp_path):
    _, report = run(tmp_path, "rep", [record(answer="Hi John, " + ANSWER), record(answer="Hi John, " + ANSWER)])
    saved = json.loads((tmp_path / "rep-out.report.json").read_text())
    assert saved["read"] == 2 and saved["written"] == 1 and saved["dropped_by_reason"] == {"dedup": 1}
    assert set(saved["rules"]) == set(clean.RULES)
    names = saved["rules"]["names"]
    assert names["changed_records"] == 2 and names["changes"] == {"greeting": 2}
    assert names["examples"][0]["before"].startswith("Hi John,") and names["examples"][0]["after"].startswith("Hi,")
    summary = (tmp_path / "rep-out.report.md").read_text()
    assert "records read 2, written 1, dropped 1" in summary and "names" in summary
    assert (tmp_path / "rep-out.report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_dictionaries_is_one_line(tmp_path, monkeypatch, capsys):
    src = write_json(tmp_path / "in.json", [record()])
    monkeypatch.setattr(clean, "HUNSPELL_DIR", tmp_path / "none")
    with pytest.raises(SystemExit) as exit_info:
        clean.main([str(src), str(tmp_path / "out.json"), "--quiet"])
    assert exit_info.value.code == 2 and not (tmp_path / "out.json").exists()
    assert "hunspell-en-us and hunspell-en-med dictionaries are not installed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("wrong-shape.json", b'[{"question": "a", "answer": "b"}]', "record 0: unknown shape"),
    ("latin1.json", '[{"instruction": "x", "input": "caf\u00e9 au lait", "output": "y"}]'.encode("latin-1"),
     "not valid UTF-8"),
    ("latin1.jsonl", '{"instruction": "x", "input": "ok", "output": "y"}\n{"instruction": "x", "input": "caf\u00e9", '
     '"output": "y"}\n'.encode("latin-1"), "line 2: not valid UTF-8"),
    ("missing.json", json.dumps([record(), record(), {"instruction": HCM, "input": "x"}]).encode(),
     "record 2: missing field 'output'"),
    ("null.jsonl", (json.dumps(record()) + "\n" + json.dumps(record(answer=None)) + "\n").encode(),
     "record 1: field 'output' must be a string, got null"),
    ("empty.json", b"  \n", "file is empty"),
    ("empty-list.json", b"[]", "no records"),
    ("broken.json", b'[{"instruction": "x", "output": "y"}, {"instruction": ', "not valid JSON"),
    ("object.json", b'{\n "instruction": "x",\n "output": "y"\n}\n', "line 1: not valid JSON"),
    ("text.json", b"hello", "not JSON or JSONL"),
    ("surrogate.jsonl", b'{"instruction": "x", "input": "\\ud800 pain", "output": "y z w"}\n',
     "record 0: field 'input' holds an invalid \\u escape (lone surrogate)"),
    ("deep.jsonl", b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "line 1: JSON nested too deeply"),
    ("deep.json", b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", "nested too deeply"),
    ("numbers.json", b"[1, 2]", "record 0: expected a JSON object, got int"),
]


@pytest.mark.parametrize("name, content, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out.json"
    out.write_text("previous output", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        clean.main([str(src), str(out), "--quiet", "--rules", "empty,dedup"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {src}") and message in lines[0], lines[0]
    assert out.read_text() == "previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.json"])  # no temp or report files


def test_command_line_exit_code_and_one_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "x", "input": "y"}\n', encoding="utf-8")
    done = subprocess.run([sys.executable, str(ROOT / "clean.py"), str(src), str(tmp_path / "out.jsonl"),
                           "--rules", "dedup"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip() == \
        f"error: {src}: record 0: unknown shape (fields ['input', 'instruction']); expected Alpaca / " \
        "HealthCareMagic ('instruction', 'input', 'output') or iCliniq ('input', 'answer_icliniq')"


@needs_dictionaries
@pytest.mark.slow
def test_cleaned_file_trains_with_train_py(tmp_path, tiny_model_dir):
    """data/clean_sample.json cleaned, then two train.py steps on the output as it is (the tiny LLaMA)."""
    import train

    out = tmp_path / "sample-clean.json"
    report = clean.main([str(ROOT / "data" / "clean_sample.json"), str(out), "--quiet"])
    assert report["written"] == 6 and report["dropped"] == 6
    train.train(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(out), "--output_dir",
                 str(tmp_path / "model"), "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--report_to", "none", "--save_strategy", "no", "--cache_dir", str(tmp_path / "cache")])
    state = json.loads((tmp_path / "model" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
