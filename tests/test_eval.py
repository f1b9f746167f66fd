"""eval.py and plot_loss.py: disease matching, metric values, the held-out split, end-to-end runs, loss plots."""
import json

import pytest

import eval as ev
import plot_loss
from utils import DISEASE_DB_PATH, GENMEDGPT_PATH

DISEASE_CSV = DISEASE_DB_PATH
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def matcher():
    return ev.DiseaseMatcher(ev.load_diseases(DISEASE_CSV))


@pytest.fixture(scope="module")
def encoder():
    return ev.Encoder()


# ----------------------------------------------------------------------------- disease database

def test_decode_escapes():
    assert ev.decode_escapes(r"Alzheimer\xe2\x80\x93type dementia") == "Alzheimer\u2013type dementia"
    assert ev.decode_escapes(r"Athlete\'s foot") == "Athlete's foot"
    assert ev.decode_escapes(r"37\xc2\xb0C and \xc3\xa6") == "37\u00b0C and \u00e6"
    assert ev.decode_escapes("plain text, no escapes") == "plain text, no escapes"


def test_load_diseases_real_csv():
    names = ev.load_diseases(DISEASE_CSV)
    assert len(names) == 796
    assert "Athlete's foot" in names and "Otitis externa (swimmer's ear)" in names
    assert not any("\\" in n for n in names)


def test_load_diseases_decodes_escaped_names(tmp_path):
    csv_path = tmp_path / "diseases.csv"
    csv_path.write_text(
        "idx,disease,Symptom\n0,Guillain\\xe2\\x80\\x93Barr\\xc3\\xa9 syndrome,[]\n1,Athlete\\'s foot,[]\n",
        encoding="utf-8",
    )
    names = ev.load_diseases(csv_path)
    assert names == ["Guillain\u2013Barr\u00e9 syndrome", "Athlete's foot"]
    m = ev.DiseaseMatcher(names)
    assert m.the_one("This looks like guillain\u2013barr\u00e9 syndrome to me.") == "Guillain\u2013Barr\u00e9 syndrome"


def test_missing_disease_csv_is_a_data_error(tmp_path):
    with pytest.raises(ev.DataError, match="not found"):
        ev.load_diseases(tmp_path / "nope.csv")


def test_word_boundaries(matcher):
    assert matcher.named("You may have the flu.") == {"Flu"}
    assert matcher.named("There is some fluid in your knee and influenza-like aches.") == set()
    assert matcher.named("ACNE, at your age, is common") == {"Acne"}
    assert "Gout" not in matcher.named("Your symptoms suggest a goutish pattern")


def test_multi_word_and_punctuated_names(matcher):
    assert matcher.the_one("It sounds like athlete's foot.") == "Athlete's foot"
    assert matcher.the_one("I suspect otitis externa (swimmer's ear), common after swimming.") == \
        "Otitis externa (swimmer's ear)"
    assert matcher.the_one("This is likely chronic obstructive pulmonary disease (COPD).") == \
        "Chronic obstructive pulmonary disease (COPD)"


def test_longest_name_wins(matcher):
    # "Sickle cell anemia" contains "Anemia": the text names one disease, not two.
    assert matcher.named("You may have sickle cell anemia.") == {"Sickle cell anemia"}
    assert matcher.the_one("You may have sickle cell anemia.") == "Sickle cell anemia"


def test_exactly_one(matcher):
    assert matcher.the_one("Could be the flu or asthma.") is None  # two diseases: not labelled
    assert matcher.the_one("Please rest and drink water.") is None  # none
    assert matcher.the_one("Gout. Definitely gout.") == "Gout"  # one disease, named twice


# ----------------------------------------------------------------------------- metrics

def test_rouge_identical_and_unrelated():
    text = "Based on your symptoms, you may have gout; we should test your uric acid."
    same, other = ev.rouge_l_scores([text, "The train leaves the station at noon on Sundays."], [text, text])
    assert same == pytest.approx(1.0)
    assert other < 0.2


def test_semantic_similarity_identical_and_unrelated(encoder):
    text = "Based on your symptoms, you may have gout; we should test your uric acid."
    sims = ev.semantic_similarity_scores(
        [text, "The train leaves the station at noon on Sundays.", "It might be arthritis of the big toe.", ""],
        [text] * 4, encoder,
    )
    assert sims[0] == pytest.approx(1.0, abs=1e-4)
    assert sims[1] < 0.2
    assert sims[1] < sims[2]  # a related medical answer beats an unrelated sentence
    assert sims[3] == 0.0  # an empty answer earns nothing


def test_bertscore_identical_and_unrelated(encoder):
    text = "You may have gout; we should test your uric acid."
    same, other = ev.bertscore_f1_scores([text, "The train leaves at noon."], [text, text], encoder)
    assert same == pytest.approx(1.0, abs=1e-4)
    assert other < same - 0.2


def test_score_diagnosis_accuracy(matcher, encoder):
    records = [
        {"instruction": "i", "input": "a", "output": "You may have gout."},
        {"instruction": "i", "input": "b", "output": "This sounds like asthma."},
        {"instruction": "i", "input": "c", "output": "Rest and drink water."},  # no disease: not counted
    ]
    rows, metrics = ev.score(records, ["Gout, I think.", "Probably the flu.", "Rest."], matcher, encoder)
    assert metrics["diagnosis_examples"] == 2 and metrics["diagnosis_correct"] == 1
    assert metrics["diagnosis_accuracy"] == pytest.approx(0.5)
    assert [r["diagnosis_correct"] for r in rows] == [True, False, None]
    assert rows[1]["predicted_diseases"] == ["Flu"]


def test_answers_that_loop_on_a_sentence_are_counted(matcher, encoder):
    looping = "You should rest. Drink plenty of water and rest.\nYou should rest! Drink plenty of water and rest."
    assert ev.repeats_a_sentence(looping)
    assert not ev.repeats_a_sentence("Take it easy. Rest. Rest. Drink plenty of water.")  # short phrases may recur
    assert not ev.repeats_a_sentence("It may be the flu. It may be a cold.")
    records = [{"instruction": "i", "input": str(i), "output": "Rest."} for i in range(4)]
    rows, metrics = ev.score(records, [looping, "Rest well.", "", "It may be the flu. See a doctor."], matcher, encoder)
    assert [r["repeats_sentence"] for r in rows] == [True, False, False, False]
    assert metrics["repeated_sentence_rate"] == pytest.approx(0.25)


def test_accepted_diagnoses_of_the_lay_set(matcher, encoder):
    """data/lay_questions.json: everyday words that name no disease of the database, several right answers."""
    from utils import ROOT, load_records

    lay = load_records(ROOT / "data" / "lay_questions.json")
    assert len(lay) >= 30 and all(r["accepted"] for r in lay)
    assert not any(matcher.named(r["input"]) for r in lay)
    assert all(set(r["accepted"]) <= set(matcher.names) for r in lay)
    record = {"instruction": "i", "input": "burns when I pee", "output": "x", "accepted": ["Urinary tract infection", "Cystitis"]}
    rows, metrics = ev.score([record, record], ["Maybe cystitis.", "Maybe gout."], matcher, encoder)
    assert [r["diagnosis_correct"] for r in rows] == [True, False] and metrics["diagnosis_examples"] == 2


# ----------------------------------------------------------------------------- held-out split

def test_heldout_never_overlaps_train(tmp_path):
    import prepare

    prepare.make_data(out_dir=tmp_path)
    train = json.loads((tmp_path / "genmedgpt_train.json").read_text())
    heldout = json.loads((tmp_path / "genmedgpt_heldout.json").read_text())
    assert len(heldout) == prepare.HELDOUT_SIZE
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in heldout}
    source = json.loads(GENMEDGPT_PATH.read_text())
    assert len(train) + len(heldout) <= len(source)
    # Same data every run: eval numbers of different sessions are comparable.
    assert heldout == json.loads((tmp_path / "genmedgpt_heldout.json").read_text())
    prepare.make_data(out_dir=tmp_path)
    assert heldout == json.loads((tmp_path / "genmedgpt_heldout.json").read_text())


def test_heldout_questions_not_in_train():
    import prepare

    source = json.loads(GENMEDGPT_PATH.read_text())
    train, heldout = prepare.split_genmedgpt(source)
    assert not {r["input"] for r in train} & {r["input"] for r in heldout}


# ----------------------------------------------------------------------------- end to end

def _heldout_sample(tmp_path, n=3):
    records = json.loads(GENMEDGPT_PATH.read_text())[:n]
    path = tmp_path / "sample.json"
    path.write_text(json.dumps(records))
    return path, records


def test_eval_end_to_end_tiny_model(tiny_model_dir, tmp_path, capsys):
    data, records = _heldout_sample(tmp_path, 4)
    out = tmp_path / "out"
    ev.main(["--model_path", str(tiny_model_dir), "--data_path", str(data), "--num_examples", "3",
             "--max_new_tokens", "6", "--batch_size", "2", "--output_dir", str(out),
             "--disease_csv", str(DISEASE_CSV)])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["reference"] for r in rows] == [r["output"] for r in records[:3]]
    assert {"instruction", "input", "reference", "prediction"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 3 and metrics["settings"]["max_new_tokens"] == 6
    for name in ("rouge_l", "semantic_similarity"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["diagnosis_accuracy"] is None or 0.0 <= metrics["diagnosis_accuracy"] <= 1.0
    assert (out / "metrics.png").read_bytes().startswith(PNG_MAGIC)
    report = (out / "report.md").read_text()
    assert "rouge_l" in report and "metrics.png" in report
    assert "semantic_similarity=" in capsys.readouterr().out


def test_generation_is_deterministic_and_batch_independent(tiny_model_dir):
    from utils import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    records = json.loads(GENMEDGPT_PATH.read_text())[:3]
    a = ev.generate_answers(model, tok, records, max_new_tokens=5, batch_size=3)
    b = ev.generate_answers(model, tok, records, max_new_tokens=5, batch_size=1)
    assert a == b and len(a) == 3


def test_compare_icliniq_writes_results(tiny_model_dir, tmp_path):
    icliniq = [{"input": f"Hi doctor, I have a cough number {i}.", "answer_icliniq": f"It may be asthma, case {i}.",
                "answer_chatgpt": "x", "answer_chatdoctor": "y"} for i in range(2)]
    data = tmp_path / "icliniq.json"
    data.write_text(json.dumps(icliniq))
    results_md = tmp_path / "docs" / "RESULTS.md"
    results_md.parent.mkdir()
    results_md.write_text("# Results\n\nHand-written notes stay.\n")
    args = ["--compare", f"a={tiny_model_dir}", f"b={tiny_model_dir}", "--data_path", str(data),
            "--max_new_tokens", "4", "--output_dir", str(tmp_path / "runs"), "--results_md", str(results_md),
            "--disease_csv", str(DISEASE_CSV)]
    metrics = ev.main(args)
    assert set(metrics) == {ev.ECHO_NAME, "a", "b"} and metrics["a"]["diagnosis_examples"] == 2
    # The echo baseline repeats the patient's message, which never names asthma here.
    echo = metrics[ev.ECHO_NAME]
    assert echo["diagnosis_accuracy"] == 0.0 and echo["generated_tokens"] == 0
    echo_rows = [json.loads(line) for line in (tmp_path / "runs" / "echo" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in echo_rows] == [r["input"] for r in icliniq]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "a" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [r["answer_icliniq"] for r in icliniq]
    text = results_md.read_text()
    assert "Hand-written notes stay." in text and "| a |" in text and "| b |" in text
    assert f"| {ev.ECHO_NAME} | `(the patient's message)` |" in text
    assert (results_md.parent / "results.png").read_bytes().startswith(PNG_MAGIC)
    ev.write_results_md(results_md, "second run")  # the generated block is replaced, not appended
    text = results_md.read_text()
    assert text.count(ev.RESULTS_BEGIN) == 1 and "second run" in text and "| a |" not in text


def test_bad_paths_fail_with_one_line(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--model_path", str(tmp_path / "no-such-model")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no-such-model" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        ev.main(["--model_path", str(tiny_model_dir), "--data_path", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err.strip()
    assert "missing.json: file not found" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        ev.main(["--compare", "justapath"])
    assert "NAME=PATH" in capsys.readouterr().err


# ----------------------------------------------------------------------------- loss plot

def test_loss_plot_from_real_trainer_state(tiny_model_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    from utils import collate_padded, load_model_and_tokenizer, tokenize_supervised

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    records = json.loads(GENMEDGPT_PATH.read_text())[:8]
    examples = tokenize_supervised(records, tok, max_length=192)
    assert len(examples) == 8
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=lambda b: collate_padded(b, tok.pad_token_id))
    trainer.train()
    trainer.save_state()
    state = tmp_path / "run" / "trainer_state.json"
    assert len(plot_loss.loss_points(json.loads(state.read_text())["log_history"])) == 3

    out = plot_loss.main([str(state)])
    assert out == tmp_path / "run" / "loss.png" and out.read_bytes().startswith(PNG_MAGIC)
    png = plot_loss.save_loss_plot(trainer.state.log_history, tmp_path / "direct" / "loss.png")
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_loss_plot_without_losses(tmp_path, capsys):
    assert plot_loss.save_loss_plot([{"train_runtime": 1.0, "step": 2}], tmp_path / "x.png") is None
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"train_runtime": 1.0, "step": 2}]}))
    with pytest.raises(SystemExit):
        plot_loss.main([str(state)])
    assert "no 'loss' entries" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_loss.main([str(tmp_path / "nowhere")])
    assert "trainer_state.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("recorded", [None, "alpaca"])
def test_eval_scores_what_chat_says(tiny_model_dir, tmp_path, recorded):
    """eval.py answers each patient message exactly as `chat.py --greedy` does for that model, with the
    prompt style train.py recorded in the folder (or chat's default for a model trained elsewhere)."""
    import shutil

    import chat
    import prompts
    import utils

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    if recorded:
        (model_dir / utils.PROMPT_STYLE_FILE).write_text(json.dumps({"prompt_style": recorded}))
    style = utils.prompt_style_for(model_dir)
    assert style == (recorded or prompts.DEFAULT_PROMPT_STYLE)
    records = json.loads(GENMEDGPT_PATH.read_text())[:2]
    model, tok = utils.load_model_and_tokenizer(model_dir)
    ours = ev.generate_answers(model, tok, records, max_new_tokens=12, batch_size=1, style=style)
    settings = {**chat.DEFAULT_GENERATION, "do_sample": False, "max_new_tokens": 12}
    said = [chat.Chat(model, tok, style, settings).respond(r["input"]) for r in records]
    assert ours == said and any(ours)


def test_recorded_prompt_style_errors(tmp_path):
    import utils

    (tmp_path / utils.PROMPT_STYLE_FILE).write_text('{"prompt_style": "shakespeare"}')
    with pytest.raises(utils.ModelLoadError, match="chatdoctor.json: prompt_style 'shakespeare' is not one of"):
        utils.recorded_prompt_style(tmp_path)
    (tmp_path / utils.PROMPT_STYLE_FILE).write_text('[1]')
    with pytest.raises(utils.ModelLoadError, match="expected a JSON object with 'prompt_style'"):
        utils.recorded_prompt_style(tmp_path)


def test_compare_options_choose_mode_and_prompt_style():
    assert ev.parse_compare(["a=m", "b=m@knowledge", "c=m@alpaca", "d=m@original,chatdoctor"]) == [
        ("a", "m", "plain", None), ("b", "m", "knowledge", None), ("c", "m", "plain", "alpaca"),
        ("d", "m", "original", "chatdoctor")]
    for bad in ("a=m@shakespeare", "a=m@knowledge,original", "=m", "a="):
        with pytest.raises(ev.ModelLoadError, match="--compare"):
            ev.parse_compare([bad])


def test_reuse_finished_rows_of_an_interrupted_comparison(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "i", "input": "I have gout?", "output": "You may have gout."}]))
    args = ["--compare", f"a={tiny_model_dir}", "--data_path", str(data), "--max_new_tokens", "3",
            "--output_dir", str(tmp_path / "runs"), "--results_md", str(tmp_path / "R.md"),
            "--disease_csv", str(DISEASE_CSV)]
    first = ev.main(args)
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: pytest.fail("a finished row was generated again"))
    again = ev.main(args + ["--reuse_finished"])
    assert again["a"]["rouge_l"] == first["a"]["rouge_l"]
    with pytest.raises(BaseException):  # other settings: the row is not reused
        ev.main(args[:-2] + ["--disease_csv", str(DISEASE_CSV), "--reuse_finished", "--max_new_tokens", "4"])


def test_eval_scores_only_the_part_of_an_eval_set_it_is_asked_for(tiny_model_dir, tmp_path):
    lay = DISEASE_DB_PATH.parent / "data" / "lay_questions.json"
    held_out = [i for i, r in enumerate(json.loads(lay.read_text(encoding="utf-8"))) if r["split"] == "heldout"]
    out = tmp_path / "out"
    ev.main(["--model_path", str(tiny_model_dir), "--data_path", str(lay), "--data_split", "heldout",
             "--num_examples", "3", "--max_new_tokens", "2", "--output_dir", str(out), "--disease_csv", str(DISEASE_CSV)])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["index"] for r in rows} <= set(held_out)
    assert json.loads((out / "metrics.json").read_text())["settings"]["data_split"] == "heldout"
