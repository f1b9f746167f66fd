"""app.py on a loopback port while one client misbehaves: it floods new sessions, uploads files, sends malformed API
calls. Two patients talking to it meanwhile keep their whole conversations; uploads are refused; each malformed call
is at most one line in the server's log; nothing the server stored is left after it stops. Bounded: a fixed number
of requests of each kind, and a deadline."""
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench_app import free_port, last_answer, patient_messages, start_app, stop_app, wait_listening  # noqa: E402

ANSWER_TOKENS = 4
FLOOD_SESSIONS = 150  # more than app.MAX_SESSIONS (64): a global least-recently-used cap evicted everyone
UPLOADS = 8
UPLOAD_BYTES = 2**20
ABUSE_SECONDS = 120  # the misbehaving client stops at this deadline even if it has not sent everything
# (route, JSON body) of calls no page makes: too few inputs, wrong types, an unknown function, garbage.
MALFORMED = [
    ("/gradio_api/call/respond", {"data": ["hi"]}),
    ("/gradio_api/call/respond", {"data": ["hi", True, "abc", {}, None, -5]}),
    ("/gradio_api/call/respond", {"data": [{"nested": ["x"] * 50}, "no", [], 1e308, "nan", "4"]}),
    ("/gradio_api/run/predict", {"data": [1, 2], "fn_index": 99}),
    ("/gradio_api/queue/join", {"data": [1], "fn_index": 0, "session_hash": "x" * 10}),
    ("/gradio_api/run/reset", {"data": "not a list"}),
    ("/gradio_api/call/respond", {"data": ["hi", True, "\x1b]0;owned\x07\x1b[2J\nfake log line", 50, 1.0, 4]}),
]


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def ask(c, message):
    return c.predict(message, True, 0.5, 50, 1.0, ANSWER_TOKENS, api_name="/respond")[1]


def misbehave(url, deadline, statuses):
    """New sessions, uploads and malformed calls, as fast as the server takes them, until done or `deadline`.
    statuses[kind]: the HTTP status of each request, or the name of the error when the server dropped it."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as http:
        def send(kind, route, **body):
            try:
                statuses.setdefault(kind, []).append(http.post(route, **body).status_code)
            except httpx.TransportError as e:  # the server may close a connection it got garbage on
                statuses.setdefault(kind, []).append(type(e).__name__)

        for n in range(FLOOD_SESSIONS):
            if time.time() > deadline:
                return
            send("reset", "/gradio_api/run/reset", json={"data": [], "session_hash": secrets.token_hex(6)})
            if n % 10 == 0:  # through the queue too: an empty message makes a session without a model call
                send("respond", "/gradio_api/call/respond", json={"data": ["", True, 0.5, 50, 1.0, ANSWER_TOKENS]})
        for _ in range(UPLOADS):
            if time.time() > deadline:
                return
            send("upload", "/gradio_api/upload",
                 files={"files": ("scan.bin", os.urandom(UPLOAD_BYTES), "application/octet-stream")})
        for route, body in MALFORMED:
            send("malformed", route, json=body)


@pytest.mark.slow
def test_conversations_survive_a_client_that_floods_uploads_and_sends_garbage(tiny_model_dir, tmp_path):
    port, log_path, temp_base = free_port(), tmp_path / "app.log", tmp_path / "gradio-temp"
    temp_base.mkdir()
    os.environ["GRADIO_TEMP_DIR"] = str(temp_base)  # read by the Popen below only
    try:
        process = start_app(["--model_path", str(tiny_model_dir), "--greedy", "--max_new_tokens", str(ANSWER_TOKENS)],
                            port, log_path)
    finally:
        del os.environ["GRADIO_TEMP_DIR"]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(process, port, log_path)
        alice, bob = client(url), client(url)
        ask(alice, "Alice: my knee hurts.")
        ask(bob, "Bob: I cough at night.")
        statuses = {}
        abuser = threading.Thread(target=misbehave, args=(url, time.time() + ABUSE_SECONDS, statuses))
        abuser.start()
        ask(alice, "Alice: it is swollen too.")  # while the flood goes on
        abuser.join(timeout=ABUSE_SECONDS + 60)
        assert not abuser.is_alive()
        alice_history = ask(alice, "Alice: what should I do?")
        bob_history = ask(bob, "Bob: and I have a fever.")
    finally:
        stop_app(process)
    log = log_path.read_text()

    assert len(statuses["reset"]) == FLOOD_SESSIONS and set(statuses["reset"]) == {200}  # the flood did reach it
    assert patient_messages(alice_history) == ["Alice: my knee hurts.", "Alice: it is swollen too.",
                                               "Alice: what should I do?"]
    assert patient_messages(bob_history) == ["Bob: I cough at night.", "Bob: and I have a fever."]
    assert last_answer(alice_history).startswith("**ChatDoctor:**") and "⚠️" not in last_answer(bob_history)

    assert statuses["upload"] == [403] * UPLOADS
    assert log.count("upload refused") >= UPLOADS

    assert len(statuses["malformed"]) == len(MALFORMED)
    assert "Traceback" not in log and "  File " not in log, log[-3000:]
    assert "\x1b" not in log and "\nfake log line" not in log  # what a client sent cannot drive the log's terminal
    request_errors = [line for line in log.splitlines() if "request failed:" in line or "Exception in ASGI" in line]
    assert 1 <= len(request_errors) <= len(MALFORMED), log[-3000:]

    assert list(temp_base.iterdir()) == []  # the server's own cache folder went with it
