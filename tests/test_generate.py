"""generate.py (InstructorDoctor) and backend.py: prompts, parsing, validation, resume, bad input, and the
OpenAI-compatible path against a real llama.cpp server on 127.0.0.1 (with real faults: killed, slow, 429, cut)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, FaultProxy, LlamaServer, error_lines, free_port, write_jsonl

import generate
import utils
from backend import Backend, BackendError

DATABASE = ROOT / "format_dataset.csv"


@pytest.fixture(scope="module")
def rows():
    return generate.read_database(DATABASE)


def exchange(row, patient, doctor):
    return generate.Exchange("0:0", row.number, row.source, row.disease, patient, doctor)


def run_generate(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def work_records(output):
    lines = generate.work_path(output).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[1:]]


# ----------------------------------------------------------------------------- the database

def test_reads_the_bundled_database_with_its_gold_standard(rows):
    assert len(rows) == 796
    panic = rows[0]
    assert (panic.disease, panic.source) == ("Panic disorder", f"{DATABASE}:1")
    assert "Sharp chest pain" in panic.symptoms and "Psychotherapy" in panic.tests
    assert "Alprazolam (Xanax)" in panic.medications


def test_jsonl_database_reads_like_the_csv(tmp_path, rows):
    path = write_jsonl(tmp_path / "db.jsonl", [
        {"disease": r.disease, "symptoms": r.symptoms, "tests": r.tests, "medications": r.medications} for r in rows[:3]])
    again = generate.read_database(path)
    assert [(r.disease, r.symptoms, r.tests, r.medications) for r in again] == \
        [(r.disease, r.symptoms, r.tests, r.medications) for r in rows[:3]]
    assert again[2].source == f"{path}:3"


# ----------------------------------------------------------------------------- prompts

def test_the_patient_prompt_has_the_symptoms_but_not_the_disease(rows):
    for voice in generate.VOICES:
        request = generate.patient_messages(rows[0], voice)[-1]["content"]
        assert "sharp chest pain" in request and "panic" not in request.lower()
    assert "Do not name any disease" in generate.patient_messages(rows[0], "lay")[-1]["content"]


def test_the_doctor_prompt_carries_the_gold_standard_and_the_patients_words(rows):
    messages = generate.doctor_messages(rows[0], "Doctor, my heart races and I cannot breathe at night.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # one worked example first
    request = messages[-1]["content"]
    assert "my heart races" in request and "Panic disorder" in request
    assert "psychotherapy, mental health counseling and electrocardiogram" in request
    assert "Lorazepam, Alprazolam and Clonazepam" in request  # brand names in parentheses left out


def test_the_worked_example_is_left_out_for_its_own_disease():
    row = generate.Row(0, "x:1", "Acute sinusitis", ["Headache"], ["Nasal endoscopy"], ["Amoxicillin"])
    assert [m["role"] for m in generate.doctor_messages(row, "Doctor, my head hurts.")] == ["system", "user"]


def test_the_one_call_prompt_asks_for_both_turns(rows):
    request = generate.exchange_messages(rows[0], "lay")[-1]["content"]
    assert "Panic disorder" in request and "without naming the disease" in request and '"Patient:"' in request


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, turn", [
    ('"Doctor, I feel dizzy and my chest is tight."', "Doctor, I feel dizzy and my chest is tight."),
    ("Patient: Doctor, I feel dizzy.\n\nDoctor: You may have panic disorder.", "Doctor, I feel dizzy."),
    ("ChatDoctor: You may have panic disorder.\nPatient: thanks", "You may have panic disorder."),
    ("  Doctor, my   head\nhurts.  ", "Doctor, my head hurts."),  # "Doctor," opens a message, it is not a label
])
def test_clean_turn(text, turn):
    assert generate.clean_turn(text) == turn


def test_split_exchange():
    text = "Patient: Doctor, I keep sneezing.\n\nDoctor: You may have allergic rhinitis. Take loratadine.\nPatient: ok"
    assert generate.split_exchange(text) == ("Doctor, I keep sneezing.", "You may have allergic rhinitis. Take loratadine.")
    assert generate.split_exchange("Doctor: only one turn here") == ("", "")


# ----------------------------------------------------------------------------- validation

PATIENT = "Doctor, I get sudden attacks where my heart pounds and I cannot breathe."
DOCTOR = ("You may have panic disorder. I recommend an electrocardiogram to rule out a heart problem and mental "
          "health counseling. I will prescribe alprazolam for the attacks.")


def test_an_exchange_with_the_gold_standard_passes(rows):
    assert generate.check(exchange(rows[0], PATIENT, DOCTOR), rows[0], "lay") is None


@pytest.mark.parametrize("patient, doctor, voice, reason", [
    ("Doctor, help.", DOCTOR, "paper", "unparsed"),
    (PATIENT, "", "paper", "unparsed"),
    ("Doctor, I think I have panic disorder, my heart pounds.", DOCTOR, "lay", "patient_names_disease"),
    (PATIENT, DOCTOR.replace("panic disorder", "an anxiety problem"), "paper", "disease_not_named"),
    (PATIENT, DOCTOR.replace("an electrocardiogram", "a scan").replace("mental health counseling", "rest"), "paper",
     "no_test_named"),
    (PATIENT, DOCTOR.replace("alprazolam", "something"), "paper", "no_medication_named"),
])
def test_each_failed_check_has_its_reason(rows, patient, doctor, voice, reason):
    assert generate.check(exchange(rows[0], patient, doctor), rows[0], voice) == reason


def test_the_paper_voice_lets_the_patient_name_the_disease(rows):
    patient = "Doctor, I think I have panic disorder, my heart pounds at night."
    assert generate.check(exchange(rows[0], patient, DOCTOR), rows[0], "paper") is None


@pytest.mark.parametrize("text, name", [
    ("I will prescribe Xanax.", "Alprazolam (Xanax)"),  # the brand name in parentheses
    ("we need blood tests", "Hematologic tests (Blood test)"),  # plural
    ("a depression screening first", "Depression screen (Depression screening)"),
    ("It looks like swimmer's ear.", "Otitis externa (swimmer's ear)"),
])
def test_names_are_found_in_the_ways_people_write_them(text, name):
    assert generate.names_any(text, [name])


def test_names_are_whole_words():
    assert not generate.names_any("a stroke of luck", ["Strep"]) and not generate.names_any("estradiols", ["Estradiol X"])
    assert not generate.names_any("Take 5 ml twice a day", ["Exam (ML)"])  # too short to stand for the test


def test_near_duplicates_are_dropped_in_database_order(rows):
    done = {
        "0:0": exchange(rows[0], PATIENT, DOCTOR),
        "0:1": generate.Exchange("0:1", 0, "x", "Panic disorder", PATIENT + " It started last week.", DOCTOR),
        "0:2": generate.Exchange("0:2", 0, "x", "Panic disorder", "Doctor, I am dizzy, I shake and sweat and my "
                                 "chest feels tight when I go out.", "You probably have panic disorder; a toxicology "
                                 "screen and psychotherapy would help, with lorazepam when it is bad."),
    }
    kept, rejected = generate.assemble([(rows[0], 0), (rows[0], 1), (rows[0], 2)], done)
    assert [k["input"] for k in kept] == [PATIENT, done["0:2"].patient]
    assert [(r["task"], r["reason"]) for r in rejected] == [("0:1", "near_duplicate")]
    assert kept[0]["instruction"] == utils.CHATDOCTOR_INSTRUCTION


def test_genmedgpts_own_exchanges_are_scored_with_the_same_checks(tmp_path):
    summary = generate.main(["--database", str(DATABASE), "--validate", str(utils.GENMEDGPT_PATH), "--limit", "10",
                             "--output", str(tmp_path / "ceiling.json")]) or \
        json.loads((tmp_path / "ceiling.json").read_text())
    assert summary["rows"] == 10 and summary["rows_with_records"] >= 8
    assert summary["accepted"] + summary["rejected"] == summary["exchanges"] > 20
    assert 0.2 < summary["acceptance_rate"] < 1.0  # most pass; the ones naming no listed test or drug do not


# ----------------------------------------------------------------------------- bad input

BAD_DATABASES = {
    "nocolumns.csv": ("idx,disease,Symptom\n0,Flu,\"['Fever']\"\n",
                      "missing column(s) ['TestsAndProcedures', 'commonMedications']"),
    "emptyrow.csv": ("idx,disease,Symptom,reason,TestsAndProcedures,commonMedications\n"
                     "0,Flu,\"['Fever']\",,\"['Swab']\",\"['Rest']\"\n,,,,,\n", "row 2: field 'disease' is empty"),
    "nosymptoms.csv": ("idx,disease,Symptom,reason,TestsAndProcedures,commonMedications\n0,Flu,[],,[],[]\n",
                       "row 1: field 'Symptom' is empty"),
    "badlist.csv": ("idx,disease,Symptom,reason,TestsAndProcedures,commonMedications\n0,Flu,\"['Fever'\",,[],[]\n",
                    "row 1: field 'Symptom': not a Python list literal"),
    "latin1.csv": ("idx,disease,Symptom,reason,TestsAndProcedures,commonMedications\n0,Ménière,\"['x']\",,[],[]\n"
                   .encode("latin-1"), "not valid UTF-8 (byte"),
    "empty.csv": ("", "file is empty"),
    "types.jsonl": ('{"disease": "Flu", "symptoms": ["Fever"]}\n{"disease": "Cold", "symptoms": "cough"}\n',
                    "line 2: field 'symptoms' must be a list of strings"),
    "nodisease.jsonl": ('{"symptoms": ["Fever"]}\n', "line 1: field 'disease' must be a non-empty string"),
    "brokenline.jsonl": ('{"disease": "Flu", "symptoms": ["Fever"]}\n{"disease": \n', "line 2: not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATABASES))
def test_a_bad_database_stops_with_one_line_and_writes_nothing(tmp_path, capsys, name):
    content, message = BAD_DATABASES[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(SystemExit) as stopped:
        generate.main(["--database", str(path), "--output", str(tmp_path / "out.json")])
    assert stopped.value.code != 0
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_an_endpoint_that_refuses_connections_stops_with_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = run_generate("--database", DATABASE, "--output", tmp_path / "out.json", "--limit", "2",
                          "--base_url", url, "--model", "teacher", "--retries", "1", timeout=60)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and url in lines[0] and "cannot connect" in lines[0] and "2 tries" in lines[0], result.stderr
    assert "0 of 2 exchanges kept" in lines[0] and not (tmp_path / "out.json").exists()


# ----------------------------------------------------------------------------- resume (in-process teacher)

def test_a_torn_work_file_resumes_to_what_one_run_makes(tmp_path, tiny_model_dir):
    """A run killed mid-write leaves whole lines and a torn one: the next run keeps the whole ones (no request made
    again for them), remakes the rest, and the result equals an uninterrupted run's."""
    common = ["--database", str(DATABASE), "--limit", "3", "--per_disease", "2", "--teacher", str(tiny_model_dir)]
    generate.main([*common, "--output", str(tmp_path / "once.json")])
    once = work_records(tmp_path / "once.json")
    assert sorted(r["task"] for r in once) == ["0:0", "0:1", "1:0", "1:1", "2:0", "2:1"]

    work = generate.work_path(tmp_path / "again.json")
    lines = generate.work_path(tmp_path / "once.json").read_text(encoding="utf-8").splitlines(keepends=True)
    work.write_text("".join(lines[:3]) + lines[3][:40], encoding="utf-8")  # settings, 2 exchanges, a torn third
    generate.main([*common, "--output", str(tmp_path / "again.json")])
    again = work_records(tmp_path / "again.json")
    assert again[:2] == once[:2]  # kept as they were
    assert sorted(again, key=lambda r: r["task"]) == sorted(once, key=lambda r: r["task"])  # same seeds, same text
    report = json.loads((tmp_path / "again.json.report.json").read_text())
    assert report["resumed_from_earlier_run"] == 2 and report["exchanges"] == 6
    assert report["accepted"] + sum(report["rejected_by_reason"].values()) == 6
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads((tmp_path / "once.json").read_text())


def test_a_work_file_of_other_settings_is_not_mixed_in(tmp_path, tiny_model_dir, capsys):
    common = ["--database", str(DATABASE), "--limit", "1", "--teacher", str(tiny_model_dir), "--output",
              str(tmp_path / "out.json")]
    generate.main(common)
    with pytest.raises(SystemExit):
        generate.main([*common, "--voice", "lay"])
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "made with other settings (voice)" in lines[0]


# ----------------------------------------------------------------------------- a real engine (llama.cpp's server)

def test_backend_chat_complete_and_stream_against_the_engine(llama_server):
    engine = Backend(llama_server, "teacher", timeout=60, retries=0)
    assert "teacher" in engine.models()
    reply = engine.chat([{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0.0, seed=1)
    assert isinstance(reply.text, str) and reply.tokens_in > 0 and 0 < reply.tokens_out <= 8
    prompt = "Patient: I have a headache.\nChatDoctor:"
    whole = engine.complete(prompt, max_tokens=12, temperature=0.0, repetition_penalty=1.0)
    pieces = list(engine.stream(prompt, max_tokens=12, temperature=0.0, repetition_penalty=1.0))
    assert len(pieces) > 1 and "".join(pieces) == whole.text  # streamed piece by piece, same greedy text


def test_generate_through_the_engine_writes_train_ready_records(llama_server, tmp_path):
    out = tmp_path / "gen.json"
    result = run_generate("--database", DATABASE, "--output", out, "--limit", "3", "--per_disease", "2",
                          "--base_url", llama_server, "--model", "teacher", "--concurrency", "3", "--retries", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    assert report["exchanges"] == 6 and report["requests"] >= 6 and report["tokens_in"] > 0 and report["tokens_out"] > 0
    assert report["accepted"] + report["rejected"] == 6
    assert json.loads(out.read_text()) == json.loads((tmp_path / "gen.json").read_text())
    assert len(Path(f"{out}.rejected.jsonl").read_text().splitlines()) == report["rejected"]
    assert sorted(r["task"] for r in work_records(out)) == ["0:0", "0:1", "1:0", "1:1", "2:0", "2:1"]


def test_a_429_is_retried_with_back_off(llama_server, tmp_path):
    proxy = FaultProxy(llama_server, refuse=2)
    try:
        result = run_generate("--database", DATABASE, "--output", tmp_path / "out.json", "--limit", "1",
                              "--base_url", proxy.base_url, "--model", "teacher", "--retries", "3", "--calls", "1")
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert proxy.requests == 3  # two refused, the third answered by the engine
    assert len(work_records(tmp_path / "out.json")) == 1


@pytest.mark.parametrize("fault, expected", [
    (dict(refuse=-1), "HTTP 429 Too many requests (proxy); 2 tries"),
    (dict(cut=True), "malformed reply"),
    (dict(delay=3.0), "no answer within 1 s (no retries)"),
])
def test_an_engine_that_keeps_failing_stops_the_run_with_one_line(llama_server, tmp_path, fault, expected):
    proxy = FaultProxy(llama_server, **fault)
    retries = "1" if "refuse" in fault else "0"
    timeout = "1" if "delay" in fault else "120"
    try:
        result = run_generate("--database", DATABASE, "--output", tmp_path / "out.json", "--limit", "2",
                              "--base_url", proxy.base_url, "--model", "teacher", "--retries", retries,
                              "--timeout", timeout, "--concurrency", "1")
    finally:
        proxy.close()
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and proxy.base_url in lines[0] and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_an_engine_killed_mid_run_loses_nothing_and_the_run_resumes(tiny_gguf, tmp_path):
    """The engine dies after a few exchanges: the run stops with one line, the exchanges made are in the work file;
    the same command against a restarted engine makes only the rest, and each task exactly once."""
    out = tmp_path / "out.json"
    server = LlamaServer(tiny_gguf)
    proxy = FaultProxy(server.base_url, delay=0.3)  # paced, so that the kill lands mid-run
    args = ["--database", DATABASE, "--output", out, "--limit", "8", "--retries", "1", "--concurrency", "1",
            "--model", "teacher"]
    run = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *map(str, args), "--base_url", proxy.base_url],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and (not generate.work_path(out).exists() or len(work_records(out)) < 2):
            time.sleep(0.1)
        server.process.send_signal(signal.SIGKILL)
        _, stderr = run.communicate(timeout=120)
    finally:
        server.stop()
        proxy.close()
    assert run.returncode != 0 and not out.exists()
    lines = error_lines(stderr)
    assert len(lines) == 1 and proxy.base_url in lines[0] and "run the same command to resume" in lines[0], stderr
    first = work_records(out)
    assert 2 <= len(first) < 8

    again = LlamaServer(tiny_gguf)
    try:
        result = run_generate(*args, "--base_url", again.base_url)
    finally:
        again.stop()
    assert result.returncode == 0, result.stderr
    assert f"resuming: {len(first)} of 8" in result.stderr
    records = work_records(out)
    assert records[:len(first)] == first and len(records) == 8
    assert sorted(r["task"] for r in records) == sorted(f"{n}:0" for n in range(8))


def test_backend_errors_are_one_line_naming_the_endpoint(llama_server):
    proxy = FaultProxy(llama_server, cut=True)
    try:
        with pytest.raises(BackendError) as raised:
            Backend(proxy.base_url, "teacher", retries=0).complete("Hello", max_tokens=4)
    finally:
        proxy.close()
    assert "\n" not in str(raised.value) and str(raised.value).startswith(proxy.base_url)
