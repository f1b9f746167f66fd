"""Issue 24: the new surfaces tried as a careless or hostile user would. Knowledge sources that are not files (a FIFO,
a device) or too large, JSON Lines with U+2028 inside a string, non-UTF-8 file names, terminal escapes in titles, a
damaged or edited knowledge cache, file-system errors and signals during the GGUF export and the index build, a model
whose weights cannot be loaded, and the web app's session limits. Each row of docs/RELIABILITY.md's "Hardening"
table names its test here."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, short_records, tiny_args, write_jsonl

import app
import benchmarks
import chat
import export_gguf
import knowledge
import train
import utils
from utils import DataError

# Characters str.splitlines() cuts at that json.dumps(ensure_ascii=False) leaves in a string as they are.
LINE_BREAKS_INSIDE_STRINGS = "\u2028\u2029\u0085\x1c\x1d\x1e\x0b\x0c"
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m\u202e\x9b1m\r"


def one_line_exit(capsys, run):
    """Run `run()`, which must exit non-zero with one `error:` line on stderr and no traceback: that line."""
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


# ----------------------------------------------------------------------------- JSON Lines

def test_json_lines_with_unicode_line_breaks_inside_strings_are_read_whole(tmp_path):
    text = f"fever{LINE_BREAKS_INSIDE_STRINGS}and cough"
    record = {"instruction": utils.CHATDOCTOR_INSTRUCTION, "input": text, "output": f"rest{LINE_BREAKS_INSIDE_STRINGS}"}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in (record, record)), encoding="utf-8")
    assert utils.load_records(data) == [record, record]

    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"title": "Flu", "text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [e.text for e in knowledge.read_jsonl(notes)] == [text]

    medqa = tmp_path / "medqa.jsonl"
    medqa.write_text(json.dumps({"question": f"Which{LINE_BREAKS_INSIDE_STRINGS}one?", "options": "A. x\nB. y",
                                 "answer": "B. y"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [q.gold for q in benchmarks.BENCHMARKS["medqa"].read(medqa)] == [1]
    assert utils.parse_jsonl("x.jsonl", '{"a": 1}\n\n{"a": 2}\n') == [(1, {"a": 1}), (3, {"a": 2})]


# ----------------------------------------------------------------------------- knowledge sources

def test_a_fifo_a_device_or_a_huge_file_as_knowledge_is_refused_before_reading(tmp_path, monkeypatch):
    fifo = tmp_path / "notes.txt"
    os.mkfifo(fifo)
    outcome = {}

    def load():
        try:
            knowledge.load_knowledge(str(fifo), cache_dir=tmp_path / "cache")
        except DataError as e:
            outcome["error"] = str(e)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # hung on the FIFO: let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome.get("error") == f"{fifo}: is a named pipe (FIFO), expected a regular file"

    device = tmp_path / "zero.txt"
    device.symlink_to("/dev/null")
    with pytest.raises(DataError, match=r"zero.txt: is a character device, expected a regular file"):
        knowledge.load_knowledge(str(device), cache_dir=tmp_path / "cache")

    monkeypatch.setattr(knowledge, "MAX_SOURCE_BYTES", 2**20, raising=False)
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as f:
        f.truncate(3 * 2**20)  # sparse: nothing to read until someone reads it
    with pytest.raises(DataError, match=r"huge.jsonl: 3 MiB is more than the 1 MiB this reads"):
        knowledge.load_knowledge(str(huge), cache_dir=tmp_path / "cache")

    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "pipe.md")
    (folder / "gout.md").write_text("Gout is a hot, swollen big toe at night.")
    assert [e.title for e in knowledge.read_entries(str(folder))] == ["gout"]  # the FIFO is skipped, not opened
    assert not (tmp_path / "cache").exists()


def non_utf8_folder(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "gout.txt").write_text("Gout is a hot, swollen big toe at night.")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "w") as f:
        f.write("Coffee and palpitations.")
    return folder


def test_a_non_utf8_file_name_in_a_knowledge_folder_is_one_line_naming_it(tmp_path, tiny_model_dir, capsys):
    import eval as ev

    folder = non_utf8_folder(tmp_path)
    expected = f"error: {folder}/caf\\xe9.txt: file name is not valid UTF-8; rename the file"
    with pytest.raises(DataError):
        knowledge.load_knowledge(str(folder), cache_dir=tmp_path / "cache")
    assert one_line_exit(capsys, lambda: chat.main(tiny_args(tiny_model_dir, "--knowledge", str(folder),
                                                             "--prompt", "hi"))) == expected
    data = tmp_path / "data.json"
    data.write_text(json.dumps(short_records(2)))
    assert one_line_exit(capsys, lambda: ev.main(["--model_path", str(tiny_model_dir), "--knowledge", str(folder),
                                                  "--data_path", str(data), "--max_new_tokens", "2",
                                                  "--output_dir", str(tmp_path / "out")])) == expected
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- the terminal

def test_terminal_escapes_in_knowledge_titles_never_reach_the_terminal(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import io

    notes = tmp_path / "notes.jsonl"
    write_jsonl(notes, [{"title": f"Gout{ESCAPES}\nInjected line", "text": "Gout: a hot, swollen big toe."}])
    piped = io.TextIOWrapper(io.BytesIO(b"My big toe is hot and swollen\n/sources\n"))
    monkeypatch.setattr("sys.stdin", piped)
    assert chat.main(tiny_args(tiny_model_dir, "--knowledge", str(notes), "--max_new_tokens", "2")) == 0
    out = capsys.readouterr().out
    assert not set(out) & set("\x1b\x07\x9b\u202e\r"), repr(out)
    assert "\nSources: notes.jsonl#1 Gout Injected line\n" in out  # the sequences gone whole, the title on one line
    assert "\n1. notes.jsonl#1 Gout Injected line (score" in out
    assert utils.terminal_safe("a\x1b[2Jb\x1b]0;title\x07c\x9b31md\x1bce\u2066f\ud800", one_line=True) == "abcdef\ufffd"
    assert utils.terminal_safe("line one\n\tline two") == "line one\n\tline two"


# ----------------------------------------------------------------------------- the knowledge cache

@pytest.mark.parametrize("damage, reason", [
    (lambda cache: (cache / "embeddings.npy").write_bytes(b""), "embeddings.npy has 0 bytes"),
    (lambda cache: shutil.rmtree(cache / "words"), "missing"),
    (lambda cache: (cache / "entries.jsonl").write_text(
        (cache / "entries.jsonl").read_text().replace("Gout", "Fake")), "entries.jsonl changed since the build"),
    (lambda cache: (cache / "dense.faiss").write_bytes(b"not written by the build"), "dense.faiss was not written"),
    (lambda cache: (cache / knowledge.MANIFEST).unlink(), "no manifest.json"),
])
def test_a_damaged_or_edited_knowledge_cache_is_rebuilt_with_one_warning(tmp_path, capsys, damage, reason):
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"title": "Gout", "text": "A hot, swollen big toe at night."},
                                                   {"title": "Asthma", "text": "Wheezing when it is cold."}])
    first = knowledge.load_knowledge(str(notes), cache_dir=tmp_path / "cache")
    capsys.readouterr()
    damage(first.cache_path)
    again = knowledge.load_knowledge(str(notes), cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: knowledge cache {first.cache_path} is damaged (")
    assert reason in err[0] and err[0].endswith("): rebuilding it")
    assert again.built and [e.title for e in again.entries] == ["Gout", "Asthma"]
    assert again.search("wheezing when cold", k=1)[0][0].title == "Asthma"
    assert not knowledge.load_knowledge(str(notes), cache_dir=tmp_path / "cache").built
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- signals mid-write

def run_until_marker(code, marker, timeout=300):
    """`python -c code` from the repository; returns the process once it has printed `marker` on stdout."""
    # A test run in the background of a shell has SIGINT ignored, and children inherit that: Ctrl-C must work here.
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    for line in process.stdout:
        if line.strip() == marker or time.time() > deadline:
            break
    assert process.poll() is None, process.stderr.read()
    return process


# Runs the index build of a small JSONL, pausing inside it (after the temporary folder has files) until signalled.
BUILD_PAUSED = """
import sys, time
import knowledge
embed = knowledge.embed
def paused_embed(texts, *args, **kwargs):
    print("building", flush=True)
    time.sleep(600)
knowledge.embed = paused_embed
knowledge.load_knowledge(sys.argv[1] if len(sys.argv) > 1 else {notes!r}, cache_dir={cache!r})
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_during_the_index_build_leaves_no_temporary_folder(tmp_path, signum):
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"title": "Gout", "text": "A hot, swollen big toe at night."}])
    cache = tmp_path / "cache"
    process = run_until_marker(BUILD_PAUSED.format(notes=str(notes), cache=str(cache)), "building")
    assert [p.name.split(".")[1][:3] for p in cache.iterdir()] == ["tmp"]  # caught mid-write
    process.send_signal(signum)
    assert process.wait(timeout=60) != 0
    if signum == signal.SIGKILL:  # nothing runs in a killed process: the next build removes what it left
        assert len(list(cache.iterdir())) == 1
        knowledge.load_knowledge(str(notes), cache_dir=cache)
        assert [p.name for p in cache.iterdir()] == [knowledge.content_hash([notes])]
    else:
        assert list(cache.iterdir()) == [], process.stderr.read()[-2000:]
        assert "Traceback" not in process.stderr.read() or signum == signal.SIGINT


EXPORT_PAUSED = """
import sys, time
import gguf
import export_gguf
write = gguf.GGUFWriter.write_tensors_to_file
def paused_write(self, *args, **kwargs):
    print("writing", flush=True)
    time.sleep(600)
gguf.GGUFWriter.write_tensors_to_file = paused_write
export_gguf.main([{model!r}, "--out", {out!r}])
"""


@pytest.mark.slow
def test_sigterm_during_the_export_leaves_no_temporary_file(tiny_model_dir, tmp_path):
    out = tmp_path / "out" / "chatdoctor.gguf"
    process = run_until_marker(EXPORT_PAUSED.format(model=str(tiny_model_dir), out=str(out)), "writing")
    assert [p.name for p in out.parent.iterdir()] == [f".chatdoctor.gguf.tmp{process.pid}"]  # caught mid-write
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == [] and "Traceback" not in process.stderr.read()


# ----------------------------------------------------------------------------- export: the file system

@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write to: chmod for a user; for root (whom chmod does not stop), a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("root without permission to mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_export_to_a_path_through_a_file_or_a_read_only_folder_is_one_line(tiny_model_dir, tmp_path, capsys,
                                                                            read_only_folder):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out in (afile / "x.gguf", afile / "sub" / "x.gguf"):
        assert one_line_exit(capsys, lambda: export_gguf.main([str(tiny_model_dir), "--out", str(out)])) == \
            f"error: {afile}: is a file, not a folder (the --out path goes through it)"
    out = read_only_folder / "x.gguf"
    line = one_line_exit(capsys, lambda: export_gguf.main([str(tiny_model_dir), "--out", str(out)]))
    assert line in (f"error: {out}: cannot write (Read-only file system)",
                    f"error: {out}: cannot write (Permission denied)")
    assert list(read_only_folder.iterdir()) == []


DISK_FULL = """
import resource, signal, sys
import export_gguf
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk does
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
export_gguf.main([{model!r}, "--out", {out!r}])
"""


@pytest.mark.slow
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "chatdoctor.gguf"
    code = DISK_FULL.format(limit=2**20, model=str(tiny_model_dir), out=str(out))  # the GGUF is ~6.5 MB
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: {out}: cannot write (disk full)"
    assert list(out.parent.iterdir()) == []

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_gguf, "write_atomic", full_disk)  # the Modelfile, after the GGUF: neither stays
    assert one_line_exit(capsys, lambda: export_gguf.main([str(tiny_model_dir), "--out", str(out)])) == \
        f"error: {out.parent / 'Modelfile'}: cannot write (disk full)"
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- train.py

def test_weights_that_cannot_be_loaded_leave_no_output_folder(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # a file of the right name that is no safetensors
    data = tmp_path / "data.json"
    data.write_text(json.dumps(short_records(8)))
    output_dir = tmp_path / "out"
    line = one_line_exit(capsys, lambda: train.main([
        "--model_name_or_path", str(broken), "--data_path", str(data), "--output_dir", str(output_dir),
        "--max_steps", "1", "--report_to", "none", "--cache_dir", str(tmp_path / "cache")]))
    assert line.startswith(f"error: {broken}: cannot load model (")
    assert not output_dir.exists()


# ----------------------------------------------------------------------------- app.py sessions

class StubChat:
    """What Sessions needs of a chat.Chat (the engine is tested in test_app.py)."""

    def reset(self):
        pass


def test_one_client_cannot_evict_conversations_in_use():
    sessions = app.Sessions(StubChat, limit=4, per_client=2, idle_seconds=60)
    alice = sessions.get("alice", "10.0.0.1")
    alice.shown.append(app.patient_message("My knee hurts."))  # a conversation in use
    for n in range(50):  # one client floods new session ids: only its own empty sessions make room
        sessions.get(f"flood{n}", "10.0.0.66")
    assert sessions.get("alice", "10.0.0.1") is alice and len(sessions) <= 4
    assert sum(s.client == "10.0.0.66" for s in sessions.by_hash.values()) == 2

    for name, address in (("bob", "10.0.0.2"), ("carol", "10.0.0.3"), ("dave", "10.0.0.4")):  # the flood's go
        sessions.get(name, address).shown.append(app.patient_message("I cough."))
    with pytest.raises(app.SessionsFull, match="busy"):  # four conversations in use: refused, none taken
        sessions.get("erin", "10.0.0.5")
    assert set(sessions.by_hash) == {"alice", "bob", "carol", "dave"}

    same = app.Sessions(StubChat, limit=10, per_client=2, idle_seconds=60)
    for name in ("tab1", "tab2"):
        same.get(name, "10.0.0.5").shown.append(app.patient_message("hello"))
    with pytest.raises(app.SessionsFull, match="from your address"):
        same.get("tab3", "10.0.0.5")
    same.by_hash["tab1"].last_used -= 61  # left alone past idle_seconds: now it may make room
    same.get("tab3", "10.0.0.5")
    assert set(same.by_hash) == {"tab2", "tab3"}
