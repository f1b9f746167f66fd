"""What the tests share: a tiny random LLaMA (fast tests), the embedded default SmolLM2 (where text matters),
short training records, the bad data files, and chat.py in a pseudo-terminal. Test modules import helpers from
here (`from conftest import ...`), never from each other."""
import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_app import wait_listening  # noqa: E402  (the one wait-until-listening loop; bench_app's processes too)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

EMBEDDED_MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The embedded default as HF safetensors (`make model`); made on first use if missing."""
    if not (EMBEDDED_MODEL_DIR / "model.safetensors").is_file():
        import prepare

        prepare.make_model(EMBEDDED_MODEL_DIR)
    return EMBEDDED_MODEL_DIR


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def make_tiny_llama(out_dir, tokenizer, seed=0, layers=2, hidden=32):
    """A randomly initialised LlamaForCausalLM with the real tokenizer, saved as a normal HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory, tiny_model_dir):
    """What train.py publishes, from two steps on the tiny LLaMA: a folder as `make demo` leaves `pretrained`."""
    import json

    import train

    work = tmp_path_factory.mktemp("trained-tiny")
    (work / "data.json").write_text(json.dumps(short_records(16)))
    train.train([
        "--model_name_or_path", str(tiny_model_dir), "--data_path", str(work / "data.json"),
        "--output_dir", str(work / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--save_strategy", "no", "--cache_dir", str(work / "cache"), "--seed", "1",
    ])
    return work / "out"


def short_records(n):
    """Real GenMedGPT questions with short answers: fast to train on, still the real format."""
    import utils

    records = utils.load_records(utils.GENMEDGPT_PATH)[:n]
    return [dict(r, output=" ".join(r["output"].split()[:12])) for r in records]


def write_jsonl(path, records):
    """JSON Lines: a record (dict) as JSON, a str as the line itself (to write broken lines on purpose)."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                          encoding="utf-8")
    return Path(path)


# file name -> (content, or None for a missing file; what the one-line DataError must say)
BAD_FILES = {
    "missing.json": (None, "file not found"),
    "empty.json": ("", "file is empty"),
    "emptylist.json": ("[]", "no records"),
    "notjson.json": ("this is not json", "not valid JSON"),
    "truncated.json": ('[{"instruction": "a", "output": "b"}, {"instr', "not valid JSON"),
    "object.json": ('{"instruction": "a", "output": "b"}', "top-level JSON object"),
    "scalar.json": ("42", "top-level JSON int"),
    "notobjects.json": ('["a", "b"]', "record 0: expected a JSON object, got str"),
    "nooutput.json": ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', "record 1: missing field 'output'"),
    "noinstruction.json": ('[{"output": "b"}]', "record 0: missing field 'instruction'"),
    "nulloutput.json": ('[{"instruction": "a", "output": null}]', "record 0: field 'output' must be a string, got null"),
    "intinput.json": ('[{"instruction": "a", "input": 3, "output": "b"}]', "record 0: field 'input' must be a string, got int"),
    "unknown.json": ('[{"question": "a", "answer": "b"}]', "record 0: unknown format"),
    "brokenline.jsonl": ('{"instruction": "a", "output": "b"}\n{"instruction": \n', "line 2: not valid JSON"),
    "icliniqnull.json": ('[{"input": "a", "answer_icliniq": null}]', "field 'answer_icliniq' must be a string"),
}


def run_train(args, env=None, torchrun=False, timeout=600):
    """train.py in a subprocess (or two ranks under torchrun, on a free port); the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = (launcher if torchrun else [sys.executable]) + [str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# `python -c KILL_DURING_SAVE <train.py args>`: SIGKILLs itself while saving checkpoint-4, after its weights are
# written and before its optimizer state is.
KILL_DURING_SAVE = """
import os, signal, sys
import checkpoints, train
save = checkpoints.AtomicCheckpointTrainer._save_optimizer_and_scheduler
def save_then_die(self, output_dir):
    if self.state.global_step == 4:  # checkpoint-4's weights are written, its optimizer state is not
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, output_dir)
checkpoints.AtomicCheckpointTrainer._save_optimizer_and_scheduler = save_then_die
train.main(sys.argv[1:])
"""


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tiny_args(model_dir, *extra):
    """chat.py arguments for a short greedy answer from `model_dir`."""
    return ["--model_path", str(model_dir), "--greedy", "--max_new_tokens", "8", *extra]


class Terminal:
    """chat.py in a pseudo-terminal, read and typed into like a person would."""

    def __init__(self, *args, stderr=None):
        """stderr: where the program's stderr goes (a file, say) instead of the terminal."""
        self.master, slave = pty.openpty()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen([sys.executable, "chat.py", *args], cwd=ROOT, stdin=slave, stdout=slave,
                                        stderr=slave if stderr is None else stderr, env=env,
                                        preexec_fn=self.take_terminal)
        os.close(slave)
        self.output = ""

    @staticmethod
    def take_terminal():
        """In the child: a new session whose controlling terminal is the pty, so that Ctrl-C sends SIGINT."""
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def expect(self, text, timeout=60):
        deadline = time.time() + timeout
        while text not in self.output:
            if time.time() > deadline or not select.select([self.master], [], [], deadline - time.time())[0]:
                raise AssertionError(f"no {text!r} in: {self.output[-2000:]!r}")
            try:
                self.output += os.read(self.master, 4096).decode(errors="replace")
            except OSError:  # the program has exited
                raise AssertionError(f"no {text!r} in: {self.output[-2000:]!r}") from None
        found = self.output
        self.output = self.output[self.output.index(text) + len(text):]
        return found

    def type(self, text):
        os.write(self.master, text.encode())

    def wait(self, timeout=30):
        """Read what is left until the program exits; its exit code."""
        deadline = time.time() + timeout
        while self.process.poll() is None and time.time() < deadline:
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.output += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        return self.process.wait(timeout=max(1, deadline - time.time()))



# ----------------------------------------------------------------------------- a real engine on loopback

def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) over a GGUF, on 127.0.0.1.

    `chat_format`: how chat-completions are prompted (chatml: SmolLM2's own; None: the GGUF's template, which
    export_gguf.py makes chat.py's ChatDoctor prompt). The completions API takes the prompt as given."""

    def __init__(self, gguf, alias="teacher", chat_format="chatml", n_ctx=1024, port=None, timeout=120):
        import serve

        self.gguf, self.alias, self.port = Path(gguf), alias, port or free_port()
        self.base_url = serve.engine_url(self.port)
        log_path = self.gguf.with_name(f"server-{self.port}.log")
        self.process = serve.start_engine(gguf, self.port, log_path, context=n_ctx, alias=alias,
                                          chat_format=chat_format)
        try:
            serve.wait_engine(self.process, self.port, log_path, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        import serve

        serve.stop_engine(self.process)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    """The tiny random LLaMA as export_gguf.py writes it (f16, a few MB): what the engine tests serve."""
    import export_gguf

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    export_gguf.export(tiny_model_dir, out)
    return out


@pytest.fixture(scope="session")
def llama_server(tiny_gguf):
    """A real llama.cpp server over the tiny GGUF for the whole session; yields its base URL (.../v1), model
    name "teacher". Tests that kill or slow an engine start their own LlamaServer."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        pytest.fail(f"llama-cpp-python[server] is not installed ({e}): run `make setup`")
    server = LlamaServer(tiny_gguf)
    yield server.base_url
    server.stop()


MITMDUMP = "/usr/bin/mitmdump"


class FaultProxy:
    """mitmproxy (mitmdump, reverse-proxy mode) in front of a real engine, with tests/fault_addon.py: it forwards
    every request and can spoil the exchange: answer 429 to the first `refuse` requests (or all, refuse=-1), wait
    `delay` seconds before forwarding, or cut the engine's answer to half its bytes (`cut`). The engine always does
    the work; only the fault is made up."""

    def __init__(self, target_base_url, refuse=0, delay=0.0, cut=False):
        import tempfile
        import urllib.parse

        if not os.access(MITMDUMP, os.X_OK):
            pytest.skip(f"no {MITMDUMP}: apt-get install mitmproxy (make test does)")
        target = urllib.parse.urlsplit(target_base_url)
        self.folder = Path(tempfile.mkdtemp(prefix="fault-proxy-"))
        self.count_file = self.folder / "requests.log"
        self.count_file.touch()
        self.received = None
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}{target.path}"
        options = {"confdir": self.folder / "conf", "refuse": refuse, "delay_ms": round(1000 * delay),
                   "cut": str(cut).lower(), "count_file": self.count_file}
        command = [MITMDUMP, "--quiet", "--listen-host", "127.0.0.1", "--listen-port", str(port),
                   "--mode", f"reverse:{target.scheme}://{target.netloc}", "-s", str(ROOT / "tests" / "fault_addon.py")]
        for name, value in options.items():
            command += ["--set", f"{name}={value}"]
        self.log = open(self.folder / "mitmdump.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_listening(self.process, port, self.folder / "mitmdump.log", timeout=60, name="mitmdump")
        except RuntimeError:
            self.close()
            raise

    @property
    def requests(self):
        """Requests received so far (after close: in all)."""
        return self.received if self.received is not None else len(self.count_file.read_text().splitlines())

    def close(self):
        import shutil

        import serve

        serve.stop_engine(self.process)
        self.log.close()
        self.received = len(self.count_file.read_text().splitlines())
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------- the web page in a browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
needs_chromium = pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                                    reason=f"no {CHROMIUM} / {CHROMEDRIVER}: apt-get install chromium chromium-driver "
                                           "(make test does)")


def chromium(width=1200, height=1000):
    """Headless Chromium with a fresh profile, nothing of it talking to the network on its own."""
    import tempfile

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers on the internet
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class Page:
    """The app in one browser tab."""

    def __init__(self, url, **size):
        self.browser = chromium(**size)
        self.browser.get(url)
        from prompts import GREETING

        self.wait_for(lambda: GREETING in self.conversation())

    def text(self, css="body"):
        from selenium.webdriver.common.by import By

        return self.browser.find_element(By.CSS_SELECTOR, css).text

    def conversation(self):
        return self.text("#conversation")

    def wait_for(self, condition, timeout=600):
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.browser, timeout, poll_frequency=0.2).until(lambda _: condition())

    def send(self, message):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.wait_for(lambda: self.browser.find_elements(By.CSS_SELECTOR, "#message textarea"))
        self.browser.find_element(By.CSS_SELECTOR, "#message textarea").send_keys(message, Keys.ENTER)
        self.wait_for(lambda: message in self.conversation())

    def answer(self):
        """The text after the last 'ChatDoctor:' of the conversation, once the answer is complete."""
        self.wait_for(lambda: not self.busy())
        from prompts import DOCTOR

        return self.conversation().rsplit(f"{DOCTOR}:", 1)[1].strip()

    def busy(self):
        from selenium.webdriver.common.by import By

        # what gradio shows while a request waits (.pending, .eta-bar) or streams (.generating)
        return bool(self.browser.find_elements(By.CSS_SELECTOR, ".pending, .generating, .eta-bar, .progress-text"))

    def click(self, css):
        from selenium.webdriver.common.by import By

        self.browser.find_element(By.CSS_SELECTOR, css).click()

    def close(self):
        self.browser.quit()


def dialogues_at_once(questions, open_client, ask, timeout=600):
    """Each name's questions asked in order by a client of its own, every name at once (threads): {name: the
    history after its last question}, for checks that sessions never mix."""
    import threading

    histories = {}

    def dialogue(name):
        c = open_client()
        for question in questions[name]:
            histories[name] = ask(c, question)

    threads = [threading.Thread(target=dialogue, args=(name,)) for name in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return histories
