"""ChatDoctor for many users: llama.cpp's OpenAI-compatible server (llama-cpp-python) over the project's GGUF export,
on 127.0.0.1, and the web page (app.py --backend) in front of it. What `make serve` runs.

    python export_gguf.py pretrained --out runs/chatdoctor.gguf           # make gguf
    python serve.py --gguf runs/chatdoctor.gguf --model_path pretrained   # engine on :8080, the page on :7860
    python serve.py --gguf runs/chatdoctor.gguf --model_path pretrained --knowledge format_dataset.csv
    python serve.py --gguf runs/chatdoctor.gguf --engine_only             # only the engine (chat.py --backend ...)

Every option serve.py does not know goes to app.py (--knowledge, --port, --greedy, ...). --model_path names the
folder the GGUF was exported from: its tokenizer counts tokens for history fitting, its prompt style is used.
The engine stops when the page does (Ctrl-C). README "Serving many users" has the same page in front of vLLM and
Ollama.

llama-cpp-python's server answers one request at a time (one slot: a lock around the model; it does not batch),
so the page lets one answer run at once and queues the rest (--backend_slots 1). llama.cpp's own llama-server
(--parallel N), vLLM and Ollama batch: give the page their slots.
"""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from backend import Backend, BackendError

ROOT = Path(__file__).resolve().parent
ENGINE_PORT = 8080
ENGINE_CONTEXT = 2048  # tokens per request, as chat.EngineSettings.backend_context assumes
MODEL_NAME = "chatdoctor"  # what the engine calls the model (--model of chat.py, app.py, eval.py)
ENGINE_SLOTS = 1  # llama-cpp-python's server: one request at a time


def engine_url(port):
    return f"http://127.0.0.1:{port}/v1"


def default_threads():
    """Every core but one. llama.cpp's threads wait for each other at every step, spinning: when one loses its core
    to another process (the page, the OS, a neighbour), they all stall. On the 2 shared cores here 40 tokens took
    137 s once with 2 threads, and 3-4 s with 1."""
    return max(1, (os.cpu_count() or 1) - 1)


def engine_command(gguf, port, threads=None, context=ENGINE_CONTEXT, alias=MODEL_NAME, chat_format=None):
    """llama-cpp-python's server over `gguf` on 127.0.0.1:`port`, set up to answer as chat.py does in-process.
    chat_format: how it prompts chat-completions (None: the GGUF's own template, chat.py's prompt)."""
    threads = threads or default_threads()
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            # By default a new request cuts off the answer being streamed: with many users every answer would be cut.
            "--interrupt_requests", "False",
            # The repetition penalty over the whole dialogue, as transformers' generate() applies it (default: 64).
            "--last_n_tokens_size", str(context),
            "--verbose", "False", *(["--chat_format", chat_format] if chat_format else [])]


def start_engine(gguf, port, log_path, threads=None, context=ENGINE_CONTEXT, **command):
    """The engine in a subprocess of its own process group, its output in `log_path`; returns the Popen at once.
    `command`: engine_command's alias and chat_format."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(engine_command(gguf, port, threads, context, **command), cwd=ROOT,
                                stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_engine(process, port, log_path, timeout=300):
    """Wait until the engine answers /v1/models; RuntimeError with its log if it exits or never does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the engine exited with {process.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            Backend(engine_url(port), MODEL_NAME, timeout=2, retries=0).models()
            return
        except BackendError:
            time.sleep(0.5)
    raise RuntimeError(f"the engine does not answer on {port} after {timeout} s:\n{Path(log_path).read_text()[-3000:]}")


def stop_engine(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=str(ROOT / "runs" / "chatdoctor.gguf"), help="the model as GGUF (make gguf)")
    p.add_argument("--engine_port", type=int, default=ENGINE_PORT)
    p.add_argument("--engine_threads", type=int, default=None, help="default: every core but one (default_threads)")
    p.add_argument("--engine_context", type=int, default=ENGINE_CONTEXT, help="tokens per request")
    p.add_argument("--engine_log", default=str(ROOT / "runs" / "engine.log"))
    p.add_argument("--engine_only", action="store_true", help="serve only the engine, no page")
    args, app_args = p.parse_known_args(argv)
    if not Path(args.gguf).is_file():
        sys.exit(f"error: {args.gguf}: GGUF file not found (make gguf writes runs/chatdoctor.gguf)")
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: llama-cpp-python's server is not installed ({e}): pip install 'llama-cpp-python[server]'")
    Path(args.engine_log).parent.mkdir(parents=True, exist_ok=True)
    engine = start_engine(args.gguf, args.engine_port, args.engine_log, args.engine_threads, args.engine_context)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` of serve.py stops the engine too (finally)
    try:
        print(f"engine: {args.gguf} on {engine_url(args.engine_port)} (model {MODEL_NAME!r}, log {args.engine_log})",
              file=sys.stderr, flush=True)
        wait_engine(engine, args.engine_port, args.engine_log)
        if args.engine_only:
            print(f"engine ready: python chat.py --backend {engine_url(args.engine_port)} --model {MODEL_NAME}",
                  file=sys.stderr, flush=True)
            return engine.wait()
        import app

        return app.main(["--backend", engine_url(args.engine_port), "--model", MODEL_NAME, "--backend_slots",
                         str(ENGINE_SLOTS), "--backend_context", str(args.engine_context), *app_args])
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        return 0
    finally:
        stop_engine(engine)


if __name__ == "__main__":
    sys.exit(main())
