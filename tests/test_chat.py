"""chat.py: prompt building, trimming, stop handling, red flags, the three modes, and a real terminal session."""
import io
import sys
import time

import pytest

import chat
import prompts
from conftest import Terminal, tiny_args
from prompts import CHATDOCTOR_INSTRUCTION, PROMPT_DICT

GREEDY = {"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from utils import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    from utils import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(embedded_model_dir)
    return model.eval(), tokenizer


def words(text):
    return len(text.split())


# ----------------------------------------------------------------------------- prompts

def test_chatdoctor_prompt_is_the_original_text():
    turns = [("Patient", "I have a cough."), ("ChatDoctor", "How long?"), ("Patient", "Two weeks.")]
    assert prompts.build_chat_prompt(turns, "chatdoctor") == (
        "If you are a doctor, please answer the medical questions based on the patient's description. \n\n"
        "ChatDoctor: I am ChatDoctor, what medical questions do you have?\n\n"
        "Patient: I have a cough.\n\nChatDoctor: How long?\n\nPatient: Two weeks.\n\nChatDoctor: "
    )


def test_alpaca_prompt_single_question_is_a_training_record():
    prompt = prompts.build_chat_prompt([("Patient", "I have a cough.")], "alpaca")
    assert prompt == PROMPT_DICT["prompt_input"].format(instruction=CHATDOCTOR_INSTRUCTION, input="I have a cough.")
    assert prompt.endswith("### Input:\nI have a cough.\n\n### Response:")


def test_alpaca_prompt_dialogue_goes_into_the_input():
    turns = [("Patient", "I have a cough."), ("ChatDoctor", "How long?"), ("Patient", "Two weeks.")]
    assert prompts.build_chat_prompt(turns, "alpaca").endswith(
        "### Input:\nPatient: I have a cough.\n\nChatDoctor: How long?\n\nPatient: Two weeks.\n\n### Response:"
    )


@pytest.mark.parametrize("style", ["chatdoctor", "alpaca"])
def test_next_turn_prefix_starts_the_next_prompt(style):
    history = [("Patient", "I have a cough."), ("ChatDoctor", "How long?")]
    prefix = prompts.next_turn_prefix(history, style)
    assert prompts.build_chat_prompt(history + [("Patient", "Two weeks.")], style).startswith(prefix)
    assert prefix.endswith("ChatDoctor: How long?\n\nPatient: ")


# ----------------------------------------------------------------------------- trimming

def dialogue(n_exchanges, newest="what now"):
    turns = []
    for i in range(n_exchanges):
        turns += [("Patient", f"question {i} " + "word " * 20), ("ChatDoctor", f"answer {i} " + "word " * 20)]
    return turns + [("Patient", newest)]


def test_fit_history_keeps_everything_that_fits():
    turns = dialogue(3)
    assert prompts.fit_history(turns, "chatdoctor", words, budget=10_000) == (turns, None)


def test_fit_history_drops_oldest_exchanges_first():
    turns = dialogue(5)
    full = words(prompts.build_chat_prompt(turns, "chatdoctor"))
    kept, notice = prompts.fit_history(turns, "chatdoctor", words, budget=full - 50)
    assert notice is None
    assert kept == turns[4:]  # two exchanges (4 turns) dropped, from the oldest
    assert words(prompts.build_chat_prompt(kept, "chatdoctor")) <= full - 50


def test_fit_history_keeps_newest_turn_and_instruction():
    turns = dialogue(4, newest="my knee hurts")
    kept, notice = prompts.fit_history(turns, "alpaca", words, budget=70)
    assert notice is None and kept == [("Patient", "my knee hurts")]
    assert CHATDOCTOR_INSTRUCTION in prompts.build_chat_prompt(kept, "alpaca")


def test_fit_history_cuts_an_overlong_message_with_a_notice(tokenizer):
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    long_message = "My stomach hurts after every meal. " * 200
    kept, notice = prompts.fit_history(dialogue(2, newest=long_message), "alpaca", count, budget=300)
    assert len(kept) == 1 and long_message.startswith(kept[0][1]) and len(kept[0][1]) > 100
    assert count(prompts.build_chat_prompt(kept, "alpaca")) <= 300
    assert "too long" in notice and "first" in notice


def test_chat_trims_to_the_context_window(tiny):
    model, tokenizer = tiny
    c = chat.Chat(model, tokenizer, "chatdoctor", GREEDY, context=160)
    for question in ["first " * 30, "second " * 30, "third " * 30]:
        c.respond(question)
        assert c.turns[0][0] == "Patient" and c.turns[-2] == ("Patient", question)
        assert c.count_tokens(prompts.build_chat_prompt(c.turns[:-1], "chatdoctor")) <= 160 - 8
    assert c.turns[0][1] != "first " * 30


# ----------------------------------------------------------------------------- stop handling and streaming

@pytest.mark.parametrize("text, expected", [
    ("  Take rest.  \n", ("Take rest.", False)),
    ("Take rest.\n\nPatient: thanks", ("Take rest.", True)),
    ("Take rest.Patient:", ("Take rest.", True)),
    ("Take rest.\n\nPat", ("Take rest.", False)),  # might become a stop: held back
    ("Take rest. Pa", ("Take rest.", False)),
    ("See a Patient", ("See a", False)),
    ("See a Patient today", ("See a Patient today", False)),  # only "Patient:" stops
    ("Take rest. \ufffd", ("Take rest.", False)),  # half a UTF-8 character
])
def test_visible_answer(text, expected):
    assert prompts.visible_answer(text) == expected


def test_streamer_never_shows_the_stop_string(tokenizer):
    shown = []
    streamer = chat.AnswerStreamer(tokenizer, shown.append)
    streamer.put(None)  # the prompt
    for token in tokenizer(" Drink water and rest.\n\nPatient: ok thanks")["input_ids"]:
        streamer.put(__import__("torch").tensor([token]))
        if streamer.stopped:
            break
    assert "".join(shown) == "Drink water and rest." and streamer.stopped


# ----------------------------------------------------------------------------- red flags

@pytest.mark.parametrize("message, sign", [
    ("I have crushing chest pain and shortness of breath", "chest pain with breathlessness"),
    ("I can't breathe and there is chest tightness", "chest pain with breathlessness"),
    ("My father's face is drooping and he has slurred speech", "signs of a stroke"),
    ("Sudden numbness in one side of my body", "signs of a stroke"),
    ("I keep having suicidal thoughts", "suicidal thoughts"),
    ("Sometimes I want to die", "suicidal thoughts"),
    ("The cut is bleeding heavily and won't stop", "severe bleeding"),
    ("I am vomiting blood", "severe bleeding"),
    ("After the bee sting my throat is swelling", "anaphylaxis"),
    ("my son had a seizure", "unconsciousness or a seizure"),
    ("I took too many pills", "poisoning or overdose"),
    ("It is the worst headache of my life", "sudden worst-ever headache"),
])
def test_red_flags_match(message, sign):
    assert sign in chat.red_flags(message)
    assert sign in chat.emergency_notice(message) and "emergency" in chat.emergency_notice(message)


@pytest.mark.parametrize("message", [
    "I have a mild cough and a runny nose",
    "My chest is fine but I have a rash",  # chest without pain, nothing about breathing
    "Some pain in my knee when I run",
    "I have a small cut on my finger",
])
def test_red_flags_stay_quiet(message):
    assert chat.red_flags(message) == [] and chat.emergency_notice(message) is None


# ----------------------------------------------------------------------------- device and dtype

def test_device_and_dtype_selection():
    assert chat.pick_device("auto", ["cpu"]) == "cpu"
    assert chat.pick_device("auto", ["cpu", "mps"]) == "mps"
    assert chat.pick_device("auto", ["cpu", "cuda", "mps"]) == "cuda"
    assert chat.pick_device("cuda:1", ["cpu", "cuda"]) == "cuda:1"
    with pytest.raises(chat.ModelLoadError, match="--device cuda: not available"):
        chat.pick_device("cuda", ["cpu"])
    assert chat.pick_dtype("auto", "cpu") == "float32"
    assert chat.pick_dtype("auto", "mps") == "float16"
    assert chat.pick_dtype("auto", "cuda", bf16_supported=True) == "bfloat16"
    assert chat.pick_dtype("auto", "cuda:0", bf16_supported=False) == "float16"
    assert chat.pick_dtype("float16", "cpu") == "float16"


# ----------------------------------------------------------------------------- generation and the KV cache

def test_cache_reuse_gives_the_same_greedy_answers_and_encodes_less(tiny):
    model, tokenizer = tiny
    questions = ["I have a headache and a fever.", "It started two days ago.", "Should I take paracetamol?"]
    encoded = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: encoded.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        runs = {}
        for reuse in (True, False):
            c = chat.Chat(model, tokenizer, "alpaca", {"do_sample": False, "max_new_tokens": 12}, reuse_cache=reuse)
            answers = c.respond_all(questions[:-1])
            encoded.clear()
            runs[reuse] = answers + [c.respond(questions[-1])]
            runs[reuse, "prefill"] = encoded[0]  # the first forward of the last turn encodes its prompt
            runs[reuse, "prompt"] = len(c.encode(prompts.build_chat_prompt(c.turns[:-1], "alpaca")))
    finally:
        hook.remove()
    assert runs[True] == runs[False] and all(runs[True])
    assert runs[False, "prefill"] == runs[False, "prompt"] - 1  # everything but the token generate() feeds
    assert runs[True, "prefill"] <= len(tokenizer(questions[-1])["input_ids"]) + 8  # only the new message


def test_split_cpu_gemv_keeps_logits_and_greedy_answers(tiny_model_dir, embedded):
    import torch
    from utils import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    model.eval()
    ids = tokenizer("Patient: I have a cough.", return_tensors="pt")["input_ids"]
    questions = ["I have a headache and a fever.", "It started two days ago."]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        steps_before = [model(input_ids=ids[:, : n + 1]).logits[0, -1] for n in range(3)]
    answers_before = chat.Chat(model, tokenizer, "chatdoctor", GREEDY).respond_all(questions)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert chat.split_cpu_gemv(model, parts=2) == len(linears) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # many rows: nn.Linear
        for n, logits in enumerate(steps_before):  # one row at a time: the blocked path
            hidden = model.model(input_ids=ids[:, : n + 1]).last_hidden_state[:, -1:]
            torch.testing.assert_close(model.lm_head(hidden)[0, 0], logits, rtol=1e-5, atol=1e-5)
    assert chat.Chat(model, tokenizer, "chatdoctor", GREEDY).respond_all(questions) == answers_before
    # Gradients go through nn.Linear untouched
    loss = model(input_ids=ids[:, :1], labels=ids[:, :1]).logits.sum()
    loss.backward()
    assert all(m.weight.grad is not None for m in linears)
    # The embedded default decodes the same greedy tokens with the blocked matmul
    big, big_tokenizer = embedded
    question = ["I have had a sore throat for a week."]
    plain_answer = chat.Chat(big, big_tokenizer, "chatdoctor", GREEDY).respond_all(question)
    try:
        chat.split_cpu_gemv(big, parts=2)
        assert chat.Chat(big, big_tokenizer, "chatdoctor", GREEDY).respond_all(question) == plain_answer
    finally:
        for m in big.modules():
            m.__dict__.pop("forward", None)


def test_ctrl_c_during_an_answer_forgets_the_exchange(tiny, monkeypatch):
    model, tokenizer = tiny
    c = chat.Chat(model, tokenizer, "chatdoctor", GREEDY)
    first = c.respond("hello")
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = model.forward
    monkeypatch.setattr(model, "forward", interrupt)
    with pytest.raises(KeyboardInterrupt):
        c.respond("second question")
    monkeypatch.undo()
    assert c.turns == [("Patient", "hello"), ("ChatDoctor", first)] and c.cache is None
    assert c.respond("second question") == chat.Chat(model, tokenizer, "chatdoctor", GREEDY, reuse_cache=False) \
        .respond_all(["hello", "second question"])[-1]


def test_embedded_model_answers_a_medical_question(embedded):
    model, tokenizer = embedded
    c = chat.Chat(model, tokenizer, "chatdoctor", {"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": 16})
    shown = []
    answer = c.respond("I have had a headache and a fever for three days. What should I do?", shown.append)
    assert answer == "".join(shown) == answer.strip()
    assert len(answer.split()) >= 5 and "Patient:" not in answer
    assert any(w in answer.lower() for w in ("doctor", "fever", "headache", "symptom", "rest", "medic"))


# ----------------------------------------------------------------------------- the command line, in-process

def expected_answers(tiny, questions):
    model, tokenizer = tiny
    return chat.Chat(model, tokenizer, prompts.DEFAULT_PROMPT_STYLE, GREEDY).respond_all(questions)


def test_one_shot_prints_only_the_answer(tiny, tiny_model_dir, capsys):
    assert chat.main(tiny_args(tiny_model_dir, "--prompt", "I have a sore throat")) == 0
    out, err = capsys.readouterr()
    assert out == expected_answers(tiny, ["I have a sore throat"])[0] + "\n"
    assert "research model" in err and "Traceback" not in err


def test_static_cache_gives_the_same_dialogue_and_reuses_it(tiny):
    model, tokenizer = tiny
    questions = ["I have a headache and a fever.", "It started two days ago.", "Should I take paracetamol?"]
    dynamic = chat.Chat(model, tokenizer, "chatdoctor", GREEDY).respond_all(questions)
    static = chat.Chat(model, tokenizer, "chatdoctor", GREEDY, context=256, static_cache=True)
    assert static.respond_all(questions) == dynamic
    assert type(static.cache).__name__ == "StaticCache"
    assert static.stats["prompt_tokens"] > 40 and static.cache.get_seq_length() == len(static.cached_ids)


def test_compile_flag_answers_like_eager(tiny, tiny_model_dir, capsys, monkeypatch):
    import io

    import torch

    compiled, real_compile = [], torch.compile

    def counting_compile(*args, **kwargs):
        compiled.append(kwargs)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    piped = "\n".join(["I have a sore throat", "It started yesterday"]) + "\n"

    old_stdin = sys.stdin
    try:
        sys.stdin = io.TextIOWrapper(io.BytesIO(piped.encode()))
        assert chat.main(tiny_args(tiny_model_dir, "--compile")) == 0
    finally:
        sys.stdin = old_stdin
    out, err = capsys.readouterr()
    assert out.splitlines() == expected_answers(tiny, ["I have a sore throat", "It started yesterday"])
    assert "compiled decoding" in err and "Traceback" not in err
    assert compiled and compiled[0]["dynamic"] is False  # generate() compiled its decoding step


def test_compile_flag_refuses_answers_longer_than_its_window(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat.main(tiny_args(tiny_model_dir, "--compile", "--max_new_tokens", "5000", "--prompt", "hi"))
    assert exit_info.value.code == 2
    assert "leaves no room" in capsys.readouterr().err


def test_one_shot_prints_the_emergency_notice_first(tiny_model_dir, capsys):
    chat.main(tiny_args(tiny_model_dir, "--prompt", "I have chest pain and I am short of breath"))
    out, err = capsys.readouterr()
    assert "emergency" in err and "chest pain with breathlessness" in err and "emergency" not in out


def test_piped_lines_are_one_conversation(tiny, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"I have a sore throat\n\nIt hurts to swallow\n")))
    assert chat.main(tiny_args(tiny_model_dir)) == 0
    out, _ = capsys.readouterr()
    assert out == "".join(a + "\n" for a in expected_answers(tiny, ["I have a sore throat", "It hurts to swallow"]))


def test_ctrl_d_at_the_prompt_exits_cleanly(tiny, monkeypatch, capsys):
    def end_of_input(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", end_of_input)
    assert chat.run_interactive(chat.Chat(*tiny, "alpaca", GREEDY)) == 0
    assert capsys.readouterr().out.startswith("ChatDoctor: I am ChatDoctor, what medical questions do you have?")


@pytest.mark.parametrize("make, reason", [
    (lambda d: None, "model folder not found"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{broken")), "no tokenizer files"),
])
def test_bad_model_path_is_one_line(tmp_path, capsys, make, reason):
    path = tmp_path / "model"
    make(path)
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model_path", str(path), "--prompt", "hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and str(path) in error_lines[0] and reason in error_lines[0]
    assert "Traceback" not in err


def test_broken_weights_are_one_line(tmp_path, tiny_model_dir, capsys):
    import shutil

    path = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SystemExit):
        chat.main(["--model_path", str(path), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert "error:" in err and str(path) in err and "cannot load model" in err and "Traceback" not in err


def test_8bit_without_cuda_is_a_clear_error(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat.main(tiny_args(tiny_model_dir, "--load_in_8bit", "--prompt", "hi"))
    assert exit_info.value.code == 2
    assert "--load_in_8bit needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real terminal session

def test_terminal_session(tiny_model_dir):
    t = Terminal(*tiny_args(tiny_model_dir))
    t.expect("research model")
    t.expect("ChatDoctor: I am ChatDoctor, what medical questions do you have?")
    t.expect("Patient: ")
    t.type("I have a headache\r")
    t.expect("ChatDoctor: ")
    answer = t.expect("Patient: ")
    assert answer.strip() and "Traceback" not in answer
    t.type("/help\r")
    t.expect("/reset")
    t.type("/reset\r")
    t.expect("(new conversation)")
    t.expect("what medical questions do you have?")
    t.type("/exit\r")
    assert t.wait() == 0


def test_terminal_ctrl_c_stops_the_answer_then_exits(tiny_model_dir):
    t = Terminal("--model_path", str(tiny_model_dir), "--max_new_tokens", "900", "--seed", "0")
    t.expect("Patient: ")
    t.type("Tell me everything about fevers\r")
    t.expect("ChatDoctor: ")
    time.sleep(0.3)
    t.type("\x03")
    t.expect("[stopped]")
    t.expect("Patient: ")
    # CPython's readline loses a SIGINT that lands between drawing the prompt and waiting for a key
    # (a window of microseconds no person hits); give it time to start waiting.
    time.sleep(0.3)
    t.type("\x03")
    code = t.wait()
    assert "Traceback" not in t.output and code == 0, t.output[-3000:]


def test_generation_flags():
    def generation_settings(args):
        return chat.settings_from(args, chat.GenerationSettings).generate_kwargs()

    sampled = generation_settings(chat.parse_args([]))
    assert sampled == {"max_new_tokens": 200, "repetition_penalty": 1.1, "do_sample": True, "temperature": 0.5,
                       "top_k": 50, "top_p": 1.0}
    assert chat.parse_args([]).model_path == "./pretrained"
    for flags in (["--greedy"], ["--temperature", "0"]):
        assert generation_settings(chat.parse_args(flags))["do_sample"] is False
    with pytest.raises(SystemExit):
        chat.parse_args(["--top_p", "0"])
