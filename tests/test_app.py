"""app.py: sessions, streaming, notices and errors in-process (fast); then the real server on a loopback port,
through gradio_client and through headless Chromium driven by selenium (slow).

    python tests/test_app.py --screenshot docs/app-screenshot.png --model_path pretrained   # the README's picture
"""
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers on the internet

import app  # noqa: E402
import chat  # noqa: E402
import knowledge  # noqa: E402
import prompts  # noqa: E402
from utils import load_model_and_tokenizer  # noqa: E402
from bench_app import free_port, last_answer, message_text, patient_messages, start_app, stop_app, wait_listening  # noqa: E402
from conftest import Page, dialogues_at_once, needs_chromium  # noqa: E402

ANSWER_TOKENS = 8
RED_FLAG = "I have crushing chest pain and can't breathe"


# ----------------------------------------------------------------------------- in-process

class ScriptedChat:
    """A stand-in for chat.Chat that streams `chunks` (pausing `pause` s each), or raises `error`."""

    def __init__(self, chunks=("Rest", " and", " fluids."), pause=0.0, error=None):
        self.chunks, self.pause, self.error = chunks, pause, error
        self.turns, self.last_hits, self.last_retrieval, self.generation = [], [], None, None

    def set_generation(self, generation):
        self.generation = generation

    def reset(self):
        self.turns = []

    def respond(self, message, on_text=None, on_notice=None):
        if self.error:
            raise self.error
        for chunk in self.chunks:
            time.sleep(self.pause)
            on_text(chunk)
        self.turns += [(prompts.PATIENT, message), (prompts.DOCTOR, "".join(self.chunks))]
        return "".join(self.chunks)


def run_answer(session, message, generation=None):
    states = list(app.stream_answer(session, message, generation or {"do_sample": False}, threading.Lock()))
    return states


def test_sessions_are_kept_apart_and_the_least_recent_evicted():
    made = []
    sessions = app.Sessions(lambda: made.append(ScriptedChat()) or made[-1], limit=2)
    a, b = sessions.get("a"), sessions.get("b")
    assert a is sessions.get("a") and a is not b and a.chat is not b.chat
    sessions.get("c")  # "b" is now the least recently used
    assert len(sessions) == 2 and sessions.get("a") is a and len(made) == 3
    assert sessions.get("b") is not b  # evicted, so a new conversation
    sessions.drop("b")
    assert len(sessions) == 1


def test_answer_streams_into_the_page_and_the_history():
    session = app.Session(ScriptedChat(pause=0.2))  # a pace the page can follow (faster states are coalesced)
    states = run_answer(session, "My knee hurts.")
    answers = [message_text(s[-1]) for s in states]
    assert len(states) >= 3 and all(later.startswith(earlier) for earlier, later in zip(answers, answers[1:]))
    assert answers[-1] == app.answer_prefix() + "Rest and fluids."
    assert [m["role"] for m in session.shown] == ["assistant", "user", "assistant"]
    assert session.chat.turns == [(prompts.PATIENT, "My knee hurts."), (prompts.DOCTOR, "Rest and fluids.")]


def test_red_flag_notice_comes_before_the_answer():
    session = app.Session(ScriptedChat())
    run_answer(session, RED_FLAG)
    texts = [message_text(m) for m in session.shown]
    assert "This may be an emergency" in texts[2] and "chest pain with breathlessness" in texts[2]
    assert texts[3].startswith(app.answer_prefix())
    run_answer(session, "Thank you.")
    assert sum("emergency" in t for t in texts) == 1 == sum("emergency" in message_text(m) for m in session.shown)


def test_sources_follow_a_grounded_answer():
    entry = SimpleNamespace(id="format_dataset.csv#181", title="Panic attack", source="format_dataset.csv:182")
    session = app.Session(ScriptedChat())
    session.chat.last_retrieval = knowledge.Retrieval([(entry, 4.7)], evidence=0.9)
    session.chat.last_hits = session.chat.last_retrieval.used
    run_answer(session, "My heart races and I cannot breathe deeply.")
    assert message_text(session.shown[-1]).endswith("<small>Sources: format_dataset.csv#181 Panic attack</small>")
    assert app.sources_markdown(session).startswith(
        "1. format_dataset.csv#181 Panic attack (score 4.700; format_dataset.csv:182)  \n(grounded (symptom evidence")


def test_an_ungrounded_answer_says_no_source_was_used():
    entry = SimpleNamespace(id="format_dataset.csv#181", title="Panic attack", source="format_dataset.csv:182")
    session = app.Session(ScriptedChat())
    session.chat.last_retrieval = knowledge.Retrieval([(entry, 1.2)], evidence=0.1)
    run_answer(session, "Can I take ibuprofen with sertraline?")
    assert message_text(session.shown[-1]).endswith(f"<small>{prompts.NO_SOURCES}</small>")
    assert "not grounded" in app.sources_markdown(session)


def test_an_error_is_one_short_line_on_the_page_and_the_dialogue_goes_on():
    session = app.Session(ScriptedChat(error=RuntimeError("boom\nTraceback (most recent call last):\n  File x")))
    run_answer(session, "Hello?")
    shown = message_text(session.shown[-1])
    assert "Sorry, that answer failed (RuntimeError: boom)" in shown and "Traceback" not in shown
    session.chat.error = None
    run_answer(session, "Hello again?")  # the session's lock was let go
    assert message_text(session.shown[-1]).endswith("Rest and fluids.")
    assert session.chat.turns[0] == (prompts.PATIENT, "Hello again?")


def test_closing_the_page_stops_the_answer_and_forgets_it():
    session = app.Session(ScriptedChat(chunks=["word "] * 200, pause=0.01))
    stream = app.stream_answer(session, "Tell me everything.", {}, threading.Lock())
    next(stream)
    stream.close()  # what gradio does when the browser goes away
    with session.lock:  # the answer has stopped: its worker let the lock go
        assert session.chat.turns == [] and session.shown == [app.greeting()]


def test_over_long_messages_are_cut_with_a_notice(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    session = app.Session(chat.Chat(model, tokenizer, "chatdoctor", {"do_sample": False, "max_new_tokens": 4}))
    run_answer(session, "my head hurts " * 2000, {"do_sample": False, "max_new_tokens": 4})
    texts = [message_text(m) for m in session.shown]
    assert any(f"only its first {app.MAX_MESSAGE_CHARS:,} are read" in t for t in texts)
    assert any("too long for the model's context" in t for t in texts)
    assert texts[-1].startswith(app.answer_prefix()) and len(session.chat.turns) == 2
    assert len(session.chat.turns[0][1]) < len(texts[1])  # the model saw a cut message, the page shows it whole


def test_page_settings_become_chat_generation_settings():
    args = app.parse_args(["--max_new_tokens", "50", "--repetition_penalty", "1.3"])
    assert args.host == "127.0.0.1" and args.port == 7860 and not hasattr(args, "prompt")
    generation = chat.settings_from(args, chat.GenerationSettings)
    sampled = app.settings_for(generation, False, 0.7, 40, 0.9, 30)
    assert sampled == {"max_new_tokens": 30, "repetition_penalty": 1.3, "do_sample": True, "temperature": 0.7,
                       "top_k": 40, "top_p": 0.9}
    assert app.settings_for(generation, False, 0, 40, 0.9, 30)["do_sample"] is False  # temperature 0 is greedy


def test_bad_model_path_is_one_line_and_no_server(tmp_path):
    port = free_port()
    done = subprocess.run([sys.executable, "app.py", "--model_path", str(tmp_path / "missing"), "--port", str(port)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == \
        [f"error: {tmp_path / 'missing'}: model folder not found"]
    assert "Traceback" not in done.stderr and "Running on" not in done.stdout + done.stderr


# ----------------------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def server(embedded_model_dir, tmp_path_factory):
    """app.py with the embedded default, greedy, short answers, on a free loopback port: its URL."""
    port, log_path = free_port(), tmp_path_factory.mktemp("app") / "app.log"
    process = start_app(["--model_path", str(embedded_model_dir), "--greedy", "--max_new_tokens",
                         str(ANSWER_TOKENS)], port, log_path)
    try:
        wait_listening(process, port, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_app(process)
        log = log_path.read_text()
        assert "Traceback" not in log, log[-3000:]


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def ask(c, message):
    return c.predict(message, True, 0.5, 50, 1.0, ANSWER_TOKENS, api_name="/respond")[1]


@pytest.mark.slow
def test_client_gets_the_answer_chat_py_gives(server, embedded_model_dir):
    question = "I have had a dry cough for two weeks."
    expected = chat.Chat(*load_model_and_tokenizer(embedded_model_dir), "chatdoctor",
                         {"do_sample": False, "max_new_tokens": ANSWER_TOKENS, "repetition_penalty": 1.1})
    history = ask(client(server), question)
    assert patient_messages(history) == [question]
    assert last_answer(history) == app.answer_prefix() + expected.respond(question)


@pytest.mark.slow
def test_client_sees_the_answer_grow(server):
    job = client(server).submit("What helps a sore throat?", True, 0.5, 50, 1.0, ANSWER_TOKENS, api_name="/respond")
    answers = [last_answer(history) for _, history, _ in job]
    growing = [a for a in dict.fromkeys(answers) if a.startswith(app.answer_prefix())]
    assert len(growing) >= 3, answers  # the empty answer, then at least two lengths of text
    assert all(later.startswith(earlier) for earlier, later in zip(growing, growing[1:]))


@pytest.mark.slow
def test_clients_at_once_keep_their_own_dialogues(server):
    questions = {name: [f"{name} has a {symptom}. What should {name} do?" for symptom in symptoms]
                 for name, symptoms in (("Anna", ("rash", "itch")), ("Ben", ("cough", "fever")))}
    histories = dialogues_at_once(questions, lambda: client(server), ask)
    for name, history in histories.items():
        assert patient_messages(history) == questions[name]
        assert last_answer(history).startswith(app.answer_prefix()) and "Sorry" not in last_answer(history)
    assert len(histories) == 2


@pytest.mark.slow
def test_listens_on_loopback_only(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # sends nothing: only picks the interface a packet would leave by
            outward = probe.getsockname()[0]
        except OSError:
            outward = "127.0.0.1"
    if outward.startswith("127."):
        pytest.skip("this machine has no network address besides loopback")
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(OSError):
        socket.create_connection((outward, port), timeout=2).close()


# ----------------------------------------------------------------------------- the browser

@pytest.fixture
def page(server):
    p = Page(server)
    yield p
    p.close()


@pytest.mark.slow
@needs_chromium
def test_page_shows_the_banner_and_streams_an_answer(page):
    assert "research model, not a doctor" in page.text("#banner")
    page.send("I have a headache and a fever since yesterday.")
    lengths = set()
    page.wait_for(lambda: lengths.add(len(page.conversation())) or not page.busy())
    assert page.answer() and len(lengths) >= 2  # the page changed while the answer was being written
    conversation = page.conversation()
    assert conversation.index("I have a headache") < conversation.rindex(f"{prompts.DOCTOR}:")


@pytest.mark.slow
@needs_chromium
def test_new_conversation_clears_the_page(page):
    page.send("My ear hurts.")
    assert page.answer()
    page.click("#reset")
    page.wait_for(lambda: "My ear hurts." not in page.conversation())
    assert prompts.GREETING in page.conversation()


@pytest.mark.slow
@needs_chromium
def test_red_flag_message_shows_the_emergency_notice(page):
    page.send(RED_FLAG)
    page.wait_for(lambda: "This may be an emergency" in page.conversation())
    conversation = page.conversation()
    assert "emergency number" in conversation
    assert conversation.index("This may be an emergency") < conversation.rindex(f"{prompts.DOCTOR}:")  # above the answer


@pytest.mark.slow
@needs_chromium
def test_two_browsers_at_once_each_get_their_own_answer(server):
    pages = [Page(server), Page(server)]
    try:
        questions = ["My left ankle is swollen after a fall.", "I keep sneezing every morning."]
        for p, question in zip(pages, questions):
            p.send(question)
        for p, question, other in zip(pages, questions, reversed(questions)):
            assert p.answer()
            assert question in p.conversation() and other not in p.conversation()
    finally:
        for p in pages:
            p.close()


# ----------------------------------------------------------------------------- the README's screenshot

def screenshot(path, model_path, question, max_new_tokens=64):
    """A real session (greedy) on a fresh server, saved as a PNG at `path`."""
    port, log_path = free_port(), Path(tempfile.mkdtemp()) / "app.log"
    process = start_app(["--model_path", str(model_path), "--greedy", "--max_new_tokens", str(max_new_tokens)],
                        port, log_path)
    try:
        wait_listening(process, port, log_path)
        p = Page(f"http://127.0.0.1:{port}", width=1100, height=900)
        try:
            p.send(question)
            print(p.answer())
            p.browser.save_screenshot(str(path))
        finally:
            p.close()
    finally:
        stop_app(process)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a screenshot of a real session.")
    parser.add_argument("--screenshot", default=str(ROOT / "docs" / "app-screenshot.png"))
    parser.add_argument("--model_path", default="pretrained")
    parser.add_argument("--question", default="Doctor, I have had a sore throat, fever and swollen glands in my neck "
                                              "for three days. What could it be?")
    cli = parser.parse_args()
    screenshot(cli.screenshot, cli.model_path, cli.question)
