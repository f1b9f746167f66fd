"""chat.py, app.py and eval.py in front of a real serving engine: llama.cpp's OpenAI-compatible server
(llama-cpp-python, serve.py) over the embedded model's f16 GGUF export, on a loopback port. The terminal, the web
page (gradio_client and headless Chromium), sessions at once, and the faults: the engine not started, too slow,
killed mid-answer; each is one line, and the dialogue goes on once the engine is back."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import chat  # noqa: E402
import prompts  # noqa: E402
import serve  # noqa: E402
from bench_app import free_port, last_answer, message_text, patient_messages, start_app, stop_app, wait_listening  # noqa: E402
from conftest import Page, dialogues_at_once, needs_chromium  # noqa: E402

RED_FLAG = "I have crushing chest pain and can't breathe"
TOKENS = 8
needs_engine = pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import llama_cpp.server"],
                                                 capture_output=True).returncode != 0,
                                  reason="llama-cpp-python[server] is not installed (make setup installs it)")


# ----------------------------------------------------------------------------- without an engine (fast)

def test_engine_request_is_greedy_or_sampled_as_in_process():
    greedy = chat.engine_request(chat.GenerationSettings(greedy=True, repetition_penalty=1.2).generate_kwargs())
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and greedy["repetition_penalty"] == 1.2
    assert greedy["extra_body"] == {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.2}  # llama.cpp's names, no min_p
    sampled = chat.engine_request(chat.GenerationSettings(temperature=0.7, top_k=40, top_p=0.9).generate_kwargs())
    assert (sampled["temperature"], sampled["top_p"], sampled["extra_body"]["top_k"]) == (0.7, 0.9, 40)


def test_approximate_token_counts_run_high_on_the_held_out_questions(tokenizer):
    import utils

    if not utils.GENMEDGPT_PATH.is_file():
        pytest.skip("no GenMedGPT data (make data)")
    texts = [r["input"] for r in utils.load_records(utils.GENMEDGPT_PATH)[:200]]
    approximate = chat.ApproximateTokenizer()
    high = sum(len(approximate(t)["input_ids"]) >= len(tokenizer(t)["input_ids"]) for t in texts)
    assert high >= 0.95 * len(texts)


@pytest.mark.parametrize("argv, says", [(["--backend", "127.0.0.1:8080"], "not an http(s) URL"),
                                        (["--model", "chatdoctor"], "give its --backend URL"),
                                        (["--backend", "http://127.0.0.1:9/v1", "--backend_timeout", "0"],
                                         "--backend_timeout > 0")])
def test_bad_backend_flags_are_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exit:
        chat.parse_args([*argv, "--prompt", "hi"])
    assert exit.value.code == 2 and says in capsys.readouterr().err.splitlines()[-1]


def test_engine_not_started_is_one_line_per_message_and_the_dialogue_goes_on(embedded_model_dir):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    done = subprocess.run([sys.executable, "chat.py", "--backend", url, "--model", serve.MODEL_NAME, "--model_path",
                           str(embedded_model_dir), "--backend_retries", "0"], cwd=ROOT, input="first\nsecond\n",
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 2 and "Traceback" not in done.stderr
    assert errors[0] == (f"error: {url}: cannot connect ([Errno 111] Connection refused; no retries) (this message "
                         "got no answer; send it again once the engine is back)")
    assert done.stdout == "\n\n"  # one (empty) line per message, as piped answers are
    assert "does not answer yet" in done.stderr  # said once at start, not fatal


# ----------------------------------------------------------------------------- the engine

class Engine:
    """llama.cpp's server (serve.py's command) over a GGUF on a fixed loopback port: started, killed, paused and
    started again by the tests."""

    def __init__(self, gguf, log_path):
        self.gguf, self.log_path, self.port = gguf, log_path, free_port()
        self.url, self.process = serve.engine_url(self.port), None

    def start(self):
        self.process = serve.start_engine(self.gguf, self.port, self.log_path)
        serve.wait_engine(self.process, self.port, self.log_path)

    def kill(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def pause(self):
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self):
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self):
        if self.process is not None:
            self.resume()
            serve.stop_engine(self.process)


@pytest.fixture(scope="module")
def gguf(embedded_model_dir, tmp_path_factory):
    import export_gguf

    return export_gguf.export(embedded_model_dir, tmp_path_factory.mktemp("gguf") / "smol-f16.gguf", "f16")["out"]


@pytest.fixture(scope="module")
def engine(gguf, tmp_path_factory):
    e = Engine(gguf, tmp_path_factory.mktemp("engine") / "engine.log")
    e.start()
    yield e
    e.stop()


def backend_args(engine, model_dir, *extra):
    return ["--backend", engine.url, "--model", serve.MODEL_NAME, "--model_path", str(model_dir), "--greedy",
            "--max_new_tokens", str(TOKENS), *extra]


def start_page(engine, model_dir, log_path, *extra):
    """app.py --backend in front of the engine on a free loopback port: (its process, its URL)."""
    port = free_port()
    process = start_app(backend_args(engine, model_dir, *extra), port, log_path)
    try:
        wait_listening(process, port, log_path)
    except RuntimeError:
        stop_app(process)
        raise
    return process, f"http://127.0.0.1:{port}"


def stop_page(process, log_path):
    stop_app(process)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def page_server(engine, embedded_model_dir, tmp_path_factory):
    """The page in front of the engine, grounded, two answers at once: its URL."""
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    process, url = start_page(engine, embedded_model_dir, log_path, "--knowledge", "format_dataset.csv",
                              "--backend_slots", "2")
    yield url
    stop_page(process, log_path)


@pytest.fixture(scope="module")
def impatient_page(engine, embedded_model_dir, tmp_path_factory):
    """The page in front of the engine, giving up on it after 5 s without a piece: its URL."""
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    process, url = start_page(engine, embedded_model_dir, log_path, "--backend_timeout", "5", "--backend_retries", "0")
    yield url
    stop_page(process, log_path)


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def submit(c, message, max_new_tokens=TOKENS):
    return c.submit(message, True, 0.5, 50, 1.0, max_new_tokens, api_name="/respond")


def ask(c, message, max_new_tokens=TOKENS):
    return submit(c, message, max_new_tokens).result()[1]


@pytest.mark.slow
@needs_engine
def test_piped_chat_over_the_engine_grounds_flags_and_answers_as_in_process(engine, embedded_model_dir):
    question = "I have had a dry cough and a fever for two weeks."  # symptoms: it is grounded (knowledge.py)
    done = subprocess.run([sys.executable, "chat.py", *backend_args(engine, embedded_model_dir, "--knowledge",
                                                                    "format_dataset.csv", "--repetition_penalty", "1")],
                          cwd=ROOT, input=f"{question}\n{RED_FLAG}\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()  # each answer, then its sources line
    assert len(lines) == 4 and all(line.startswith("Sources: format_dataset.csv#") for line in lines[1::2]), lines
    assert "This may be an emergency (chest pain with breathlessness)" in done.stderr
    assert f"{serve.MODEL_NAME} at {engine.url}" in done.stderr
    local = chat.load_engine(chat.EngineSettings(model_path=str(embedded_model_dir), device="cpu",
                                                 knowledge="format_dataset.csv"), sys.stderr)
    expected = local.new_chat(chat.GenerationSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=TOKENS))
    assert lines[0] == expected.respond(question)  # the same prompt and retrieval, the same greedy words
    assert lines[1] == prompts.sources_line(expected.last_hits)


@pytest.mark.slow
@needs_engine
def test_sessions_at_once_keep_their_own_dialogues_sources_and_notices(page_server):
    questions = {"Anna": ["Anna has a rash. What should Anna do?", "Anna's rash itches at night. Why?"],
                 "Ben": [RED_FLAG, "Ben also has a fever, a sore throat and swollen glands."]}
    histories = dialogues_at_once(questions, lambda: client(page_server), ask)
    assert len(histories) == 2
    for name, history in histories.items():
        assert patient_messages(history) == questions[name]
        answer = last_answer(history)
        assert answer.startswith("**ChatDoctor:** ") and "Sources: format_dataset.csv#" in answer, answer
    notices = [message_text(m) for m in histories["Ben"] if "This may be an emergency" in message_text(m)]
    assert len(notices) == 1 and not any("emergency" in message_text(m) for m in histories["Anna"])


@pytest.mark.slow
@needs_engine
@needs_chromium
def test_browser_page_over_the_engine_streams_a_grounded_answer_under_its_notice(page_server):
    page = Page(page_server)
    try:
        # Every state of the conversation, recorded in the browser as it changes (polling from here can miss a
        # short stream): a streamed answer shows at least two different non-empty partial answers.
        page.browser.execute_script(
            "window.states = []; const c = document.querySelector('#conversation');"
            "new MutationObserver(() => window.states.push(c.innerText))"
            ".observe(c, {subtree: true, childList: true, characterData: true});")
        page.send(RED_FLAG)
        answer = page.answer()
        partial = {state.rsplit(f"{prompts.DOCTOR}:", 1)[1].strip() for state in page.browser.execute_script(
            "return window.states") if RED_FLAG in state and f"{prompts.DOCTOR}:" in state.split(RED_FLAG, 1)[1]}
        conversation = page.conversation()
        assert len(partial - {""}) >= 2 and "Sources: format_dataset.csv#" in answer
        assert conversation.index("This may be an emergency") < conversation.rindex(f"{prompts.DOCTOR}:")
    finally:
        page.close()


@pytest.mark.slow
@needs_engine
def test_page_faults_are_one_line_and_the_session_goes_on(engine, impatient_page):
    c = client(impatient_page)
    engine.pause()  # a first token later than --backend_timeout 5
    try:
        slow = last_answer(ask(c, "My knee hurts when I climb stairs."))
    finally:
        engine.resume()
    assert slow.startswith("⚠️ No answer: the model server failed") and "no answer within 5 s" in slow
    assert "\n" not in slow
    job = submit(c, "Tell me everything about migraines and how to treat them.", max_new_tokens=400)
    while not any(len(last_answer(history)) > len("**ChatDoctor:** ") for _, history, _ in job.outputs()):
        assert not job.done(), job.outputs()[-1]
        time.sleep(0.05)
    engine.kill()  # mid-answer
    died = last_answer(job.result()[1])
    assert died.startswith("⚠️ No answer: the model server failed") and "\n" not in died, died
    engine.start()
    history = ask(c, "My knee still hurts.")
    assert last_answer(history).startswith("**ChatDoctor:** ") and "failed" not in last_answer(history)
    assert patient_messages(history)[-1] == "My knee still hurts."


@pytest.mark.slow
@needs_engine
def test_terminal_slow_engine_then_killed_mid_answer_then_back(engine, embedded_model_dir):
    process = subprocess.Popen([sys.executable, "chat.py", *backend_args(engine, embedded_model_dir),
                                "--max_new_tokens", "400", "--backend_retries", "0", "--backend_timeout", "5"],
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, bufsize=1)

    def say(message):
        process.stdin.write(f"{message}\n")
        process.stdin.flush()

    def next_error():
        return next(line for line in process.stderr if line.startswith("error:"))

    try:
        engine.pause()
        try:
            say("My knee hurts when I climb stairs.")
            slow = next_error()
        finally:
            engine.resume()
        assert f"{engine.url}: no answer within 5 s (no retries)" in slow and "send it again" in slow
        assert process.stdout.readline() == "\n"  # the message's (empty) answer line
        say("Tell me everything about migraines and how to treat them.")
        assert process.stdout.read(1)  # the answer has begun
        engine.kill()
        killed = next_error()
        assert engine.url in killed and "send it again once the engine is back" in killed
        engine.start()
        say("Thank you.")
        process.stdin.close()
        out, err = process.stdout.read(), process.stderr.read()  # to the end: the program has exited
        process.wait(timeout=60)
        assert out.split("\n")[1].strip(), out  # after the cut answer's line: the answer to "Thank you."
        assert "Traceback" not in err and process.returncode == 1  # 1: some messages got no answer
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
@needs_engine
def test_eval_over_the_engine_gets_the_in_process_greedy_answers(engine, embedded_model_dir):
    import eval as ev
    import utils
    from backend import Backend

    records = utils.load_records(utils.GENMEDGPT_PATH)[:3]
    model, tokenizer = utils.load_model_and_tokenizer(embedded_model_dir)
    served = ev.generate_answers(Backend(engine.url, serve.MODEL_NAME), tokenizer, records, TOKENS, batch_size=3,
                                 repetition_penalty=1.0)
    assert served == ev.generate_answers(model, tokenizer, records, TOKENS, batch_size=1, repetition_penalty=1.0)
    assert all(served)
