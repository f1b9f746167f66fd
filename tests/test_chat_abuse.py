"""chat.py under abuse, through the real program: a huge message, bytes that are not text, blank lines, a flood
of lines, the terminal closed under an answer, stdout closed early. Never a traceback, never a hang.
(Ctrl-C during an answer: tests/test_chat.py::test_terminal_ctrl_c_stops_the_answer_then_exits.)"""
import os
import select
import signal
import subprocess
import sys
import time

import pytest

import chat
from conftest import ROOT, Terminal, tiny_args

# One thread: on a busy machine torch's second thread mostly waits for a core, which makes generation slower.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
LONG_MESSAGE = ("my head hurts and I feel dizzy " * 4000)[:100_000]


def run_piped(model_dir, stdin, *extra, timeout=180):
    """chat.py with `stdin` (bytes) piped in; the finished process, its stdout and stderr as text."""
    return subprocess.run([sys.executable, "chat.py", *tiny_args(model_dir, *extra)], cwd=ROOT, input=stdin,
                          capture_output=True, env=ENV, timeout=timeout, text=False)


def text_of(result):
    return result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


def type_all(terminal, text):
    """Type a text longer than the terminal's buffers, reading its echo meanwhile so that neither side blocks."""
    data = text.encode()
    while data:
        readable, writable, _ = select.select([terminal.master], [terminal.master], [], 10)
        if readable:
            terminal.output += os.read(terminal.master, 65536).decode(errors="replace")
        if writable:
            data = data[os.write(terminal.master, data[:4096]):]
        assert readable or writable, "the terminal stopped taking input"


# ----------------------------------------------------------------------------- piped stdin

def test_piped_100k_character_message_is_cut_with_a_notice_and_answered(tiny_model_dir):
    result = run_piped(tiny_model_dir, f"{LONG_MESSAGE}\nand my neck is stiff\n".encode())
    out, err = text_of(result)
    assert result.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "your message is too long for the model's context: only its first" in err
    assert out.count("\n") == 2  # an answer to each line, the long one included


def test_piped_invalid_utf8_line_gets_a_notice_and_the_next_line_is_answered(tiny_model_dir):
    result = run_piped(tiny_model_dir, b"\xff\xfe\x00garbage\nI have a cough\ncaf\xe9 makes my heart race\n")
    out, err = text_of(result)
    assert result.returncode == 0 and "Traceback" not in err, err[-2000:]
    notices = [line for line in err.splitlines() if "not valid utf-8" in line]
    replaced = "the bytes that are not text are replaced by U+FFFD)"
    assert notices == [f"(input line 1 is not valid utf-8 at byte 0: {replaced}",
                       f"(input line 3 is not valid utf-8 at byte 3: {replaced}"]
    assert out.count("\n") == 3  # the bad lines answered after replacement, the good one too


def test_prompt_argument_bytes_that_are_not_text_become_replacement_characters():
    assert chat.argv_text(os.fsdecode(b"caf\xe9 \xff")) == "caf\ufffd \ufffd"
    assert chat.argv_text("caf\u00e9") == "caf\u00e9"


class RecordingChat:
    def __init__(self):
        self.messages, self.last_hits = [], []  # no knowledge base: nothing retrieved

    def respond(self, message, on_text=None, on_notice=None):
        self.messages.append(message)
        return ""


def test_blank_and_whitespace_lines_never_reach_the_model(monkeypatch, capsys):
    blank = ["", "\n", "   \n", "\t\n", "\r\n", "\u3000 \u00a0\n"]
    recorder = RecordingChat()
    chat.run_lines(recorder, blank + ["I have a cough\n"] + blank)
    assert recorder.messages == ["I have a cough"]

    typed = iter(line.rstrip("\n") for line in blank)

    def next_line(prompt):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", next_line)
    recorder = RecordingChat()
    assert chat.run_interactive(recorder) == 0 and recorder.messages == []


@pytest.mark.slow
def test_a_flood_of_200_lines_gets_one_answer_each_and_ends(tiny_model_dir):
    lines = [f"question {i}: my knee hurts" if i % 10 else "  " for i in range(220)]
    start = time.time()
    result = run_piped(tiny_model_dir, "\n".join(lines).encode() + b"\n", "--max_new_tokens", "1", timeout=300)
    out, err = text_of(result)
    assert result.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert out.count("\n") == 198, (out.count("\n"), time.time() - start)


def test_stdout_closed_early_is_no_broken_pipe_traceback(tiny_model_dir, tmp_path):
    """`python chat.py < questions | head -1`"""
    questions = tmp_path / "questions"
    questions.write_text("".join(f"question {i}: my back aches\n" for i in range(300)))
    with open(questions, "rb") as stdin, open(tmp_path / "stderr", "wb") as stderr:
        process = subprocess.Popen([sys.executable, "chat.py", *tiny_args(tiny_model_dir)], cwd=ROOT, stdin=stdin,
                                   stdout=subprocess.PIPE, stderr=stderr, env=ENV)
        first = process.stdout.readline()
        process.stdout.close()
        code = process.wait(timeout=60)
    err = (tmp_path / "stderr").read_text(errors="replace")
    assert first.endswith(b"\n") and code == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


# ----------------------------------------------------------------------------- a real terminal

@pytest.mark.slow
def test_terminal_long_message_bytes_that_are_not_text_and_blank_lines(tiny_model_dir):
    t = Terminal(*tiny_args(tiny_model_dir))
    t.expect("Patient: ")
    type_all(t, LONG_MESSAGE + "\r")
    t.expect("your message is too long for the model's context", timeout=120)
    t.expect("ChatDoctor: ")
    assert "Traceback" not in t.expect("Patient: ")
    for blank in ("\r", "   \r", "\t \r"):
        t.type(blank)
        assert "ChatDoctor" not in t.expect("Patient: ")
    os.write(t.master, b"caf\xe9 \xff\xfe garbage\r")
    t.expect("ChatDoctor: ")
    t.expect("Patient: ")
    t.type("/exit\r")
    code = t.wait()
    assert code == 0 and "Traceback" not in t.output and "error:" not in t.output, t.output[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("sighup", ["default", "ignored"])
def test_terminal_closed_during_an_answer_ends_promptly_without_traceback(tiny_model_dir, tmp_path, sighup):
    """Closing the terminal's master side hangs it up: the program gets SIGHUP, which by default ends it;
    where SIGHUP is ignored (nohup), its next write fails with EIO instead."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN if sighup == "ignored" else signal.SIG_DFL)
    try:  # the child inherits the disposition
        with open(tmp_path / "stderr", "wb") as stderr:
            t = Terminal("--model_path", str(tiny_model_dir), "--max_new_tokens", "900", "--seed", "0", stderr=stderr)
    finally:
        signal.signal(signal.SIGHUP, previous)
    t.expect("Patient: ")
    t.type("Tell me everything about fevers\r")
    t.expect("ChatDoctor: ")
    time.sleep(0.3)
    assert t.process.poll() is None and "Patient: " not in t.output, "the answer ended before the terminal closed"
    os.close(t.master)
    closed = time.time()
    code = t.process.wait(timeout=30)
    err = (tmp_path / "stderr").read_text(errors="replace")
    assert time.time() - closed < 15 and "Traceback" not in err, err[-2000:]
    if sighup == "default":
        assert code == -signal.SIGHUP and err == ""
    else:
        assert code == 1 and err.strip().splitlines()[-1] == "error: the terminal was closed"
