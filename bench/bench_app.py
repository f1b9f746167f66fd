"""The web app under load: many gradio_client clients at once against app.py on loopback.

    python bench/bench_app.py                                   # 20 clients x 2 turns, embedded model, print
    python bench/bench_app.py --write docs/BENCHMARKS.md        # also into its '## Web app' section
    python bench/bench_app.py --model_path pretrained --clients 5 --max_new_tokens 48
    python bench/bench_app.py --gguf runs/chatdoctor-smol-f16.gguf --write docs/BENCHMARKS.md   # app.py --backend:
        # the page in front of llama.cpp's server (serve.py) over that GGUF, into '## Web app over a serving engine'
    python bench/bench_app.py --backend http://HOST:PORT/v1 --model NAME --backend_slots 64    # an engine running

Each client is its own session (a tab): it asks its own held-out GenMedGPT questions, one turn after the other,
and checks that every answer came and that the history the server sends back holds its own messages and no
other client's. The model answers one message at a time (the app's queue), so time to first token under load
is mostly waiting in that queue: the table gives it beside the time of a lone client on the same server.
With --gguf or --backend the same clients talk to app.py --backend: answers from a serving engine, up to
--backend_slots at once.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SECTION = "## Web app"
SECTION_BEGIN = "<!-- bench/bench_app.py: begin (generated; edits inside are overwritten) -->"
SECTION_END = "<!-- bench/bench_app.py: end -->"
ENGINE_SECTION = "## Web app over a serving engine"
ENGINE_BEGIN = "<!-- bench/bench_app.py --backend: begin (generated; edits inside are overwritten) -->"
ENGINE_END = "<!-- bench/bench_app.py --backend: end -->"
FAILED = "Sorry, that answer failed"


# ----------------------------------------------------------------------------- the server (tests use these too)

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(app_args, port, log_path):
    """app.py on 127.0.0.1:`port` in a subprocess, its output in `log_path`; returns the Popen at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "app.py"), *app_args, "--port", str(port)], cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_listening(process, port, log_path, timeout=600, name="app.py"):
    """Wait until `process` (app.py, or what `name` says) accepts connections on `port`; RuntimeError with its log
    if it exits or never does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{name} not listening on {port} after {timeout} s:\n{Path(log_path).read_text()[-3000:]}")


def stop_app(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ----------------------------------------------------------------------------- one client

def message_text(message):
    """A chat message's text as gradio_client returns it (a string, or a list of {'type': 'text', ...} parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def patient_messages(history):
    return [message_text(m) for m in history if m["role"] == "user"]


def last_answer(history):
    return message_text(history[-1]) if history and history[-1]["role"] == "assistant" else ""


def ask(client, message, max_new_tokens):
    """One turn through the page's endpoint: (history sent back at the end, seconds to the first answer text,
    seconds in all)."""
    from app import answer_prefix

    start = time.perf_counter()
    first = None
    job = client.submit(message, True, 0.5, 50, 1.0, max_new_tokens, api_name="/respond")
    for _, history, _ in job:
        if first is None and len(last_answer(history)) > len(answer_prefix()):
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    history = job.outputs()[-1][1]
    return history, first if first is not None else total, total


def dialogue(url, questions, max_new_tokens, results, errors):
    """One client: its questions in turn; each turn's (ttft, total) into `results`, any problem into `errors`."""
    from gradio_client import Client

    try:
        client = Client(url, verbose=False)
        for turn, question in enumerate(questions, 1):
            history, ttft, total = ask(client, question, max_new_tokens)
            if patient_messages(history) != questions[:turn]:
                errors.append(f"turn {turn}: history holds {patient_messages(history)}, expected {questions[:turn]}")
            elif FAILED in last_answer(history) or not last_answer(history).strip():
                errors.append(f"turn {turn}: no answer ({last_answer(history)[:200]!r})")
            else:
                results.append((ttft, total))
    except Exception as e:  # a refused or dropped request is a finding, not a crash of the benchmark
        errors.append(f"{type(e).__name__}: {e}")


def run_clients(url, question_sets, max_new_tokens):
    """All clients at once; (per-turn (ttft, total) list, errors, seconds in all)."""
    results, errors = [], []
    threads = [threading.Thread(target=dialogue, args=(url, qs, max_new_tokens, results, errors))
               for qs in question_sets]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors, time.perf_counter() - start


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# ----------------------------------------------------------------------------- report

def report(args, description, load_start, solo, loaded, errors, wall, app_args, engine):
    import machine

    command = " ".join(["python bench/bench_app.py"] + sys.argv[1:])
    requests = args.clients * args.turns
    lines = [f"`{command}` on {machine.summary(description)}, load average {load_start:.1f} at start; app.py "
             f"`{' '.join(app_args)}` on loopback{engine}, {time.strftime('%Y-%m-%d')}. Each client is one "
             f"gradio_client session asking {args.turns} held-out GenMedGPT questions in turn; times are per request "
             "as the client sees them, from sending the message.",
             "", "| clients at once | requests | answered | time to first token p50 / p95 | total p50 / p95 | wall |",
             "|---|---|---|---|---|---|"]
    for label, rows, n, seconds in (("1 (alone)", solo, len(solo), sum(t for _, t in solo)),
                                    (str(args.clients), loaded, requests, wall)):
        ttft, total = [r[0] for r in rows], [r[1] for r in rows]
        lines.append(f"| {label} | {n} | {len(rows)} | {statistics.median(ttft):.1f} s / {percentile(ttft, 95):.1f} s "
                     f"| {statistics.median(total):.1f} s / {percentile(total, 95):.1f} s | {seconds:.0f} s |")
    verdict = ("every request answered, each client's history held only its own messages, no error"
               if not errors else f"{len(errors)} problems, e.g. {errors[0]}")
    if args.backend or args.gguf:
        how = (f"The page lets {args.backend_slots} answer(s) run at once (`--backend_slots`, the engine's parallel "
               "slots) and queues the rest; the lone client's row is the engine's own time per request here.")
    else:
        how = ("The model answers one message at a time (`demo.queue(default_concurrency_limit=1)` and a lock), so a "
               "request's time to first token is mostly its wait in the queue; the lone client's row is the model's "
               "own time per request on this machine.")
    lines += ["", f"Under load: {verdict}. {how}"]
    if load_start > (os.cpu_count() or 1):
        lines += ["", "Other jobs shared the CPU during this run (load average above the core count): the times are "
                  "slower and noisier than an idle machine's."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--data_path", default=str(ROOT / "data" / "genmedgpt_heldout.json"))
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--solo", type=int, default=3, help="requests of one lone client first (the unloaded baseline)")
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--write", help="markdown file whose '## Web app' section (with an engine: '## Web app over a "
                                   "serving engine') gets the results")
    e = p.add_argument_group("a serving engine (app.py --backend; --model_path then gives the tokenizer)")
    e.add_argument("--gguf", help="start llama.cpp's server (serve.py) over this GGUF on a free port")
    e.add_argument("--engine_threads", type=int, default=None, help="with --gguf: its threads (serve.py's default)")
    e.add_argument("--backend", metavar="URL", help="or an engine already running at this OpenAI-compatible URL")
    e.add_argument("--model", metavar="NAME", help="with --backend: the engine's name of the model")
    e.add_argument("--backend_slots", type=int, default=None,
                   help="answers app.py lets run at once (default: serve.py's slots with --gguf, else 1)")
    args = p.parse_args()
    if args.gguf and args.backend:
        p.error("--gguf starts an engine; --backend uses one already running: give one of them")

    import machine
    from utils import load_data, relative, replace_markdown_section

    records = load_data(args.data_path)
    questions = list(dict.fromkeys(" ".join(r["input"].split()) for r in records))  # distinct, one line each
    needed = args.solo + args.clients * args.turns
    if len(questions) < needed:
        sys.exit(f"error: {args.data_path} has {len(questions)} distinct questions; {needed} needed")
    description, load_start = machine.describe(), os.getloadavg()[0]
    port, log_path = free_port(), ROOT / "runs" / "bench_app.log"
    log_path.parent.mkdir(exist_ok=True)
    engine, engine_text, app_args = None, "", ["--model_path", relative(args.model_path), "--greedy",
                                               "--max_new_tokens", str(args.max_new_tokens),
                                               # every client here has the same address: the warm-up, lone and
                                               # loaded clients' sessions
                                               "--max_sessions_per_client", str(args.clients + 2)]
    if args.gguf:
        import serve

        engine_port, engine_log = free_port(), ROOT / "runs" / "bench_app_engine.log"
        engine = serve.start_engine(args.gguf, engine_port, engine_log, args.engine_threads)
        serve.wait_engine(engine, engine_port, engine_log)
        args.backend, args.model = serve.engine_url(engine_port), serve.MODEL_NAME
        args.backend_slots = args.backend_slots or serve.ENGINE_SLOTS
        command = serve.engine_command(relative(args.gguf), engine_port, args.engine_threads)
        engine_text = (f", in front of llama-cpp-python's server over `{relative(args.gguf)}` "
                       f"(`{' '.join(command[1:])}`)")
    if args.backend:
        args.backend_slots = args.backend_slots or 1
        app_args += ["--backend", args.backend, "--backend_slots", str(args.backend_slots)]
        app_args += ["--model", args.model] if args.model else []
    process = start_app(app_args, port, log_path)
    try:
        wait_listening(process, port, log_path)
        url = f"http://127.0.0.1:{port}"
        run_clients(url, [questions[:1]], args.max_new_tokens)  # warm-up: the first answer pays one-time costs
        solo, solo_errors, _ = run_clients(url, [questions[:args.solo]], args.max_new_tokens)
        sets = [questions[args.solo + i * args.turns: args.solo + (i + 1) * args.turns] for i in range(args.clients)]
        loaded, errors, wall = run_clients(url, sets, args.max_new_tokens)
    finally:
        stop_app(process)
        if engine is not None:
            serve.stop_engine(engine)
    errors = solo_errors + errors
    for error in errors:
        print(f"problem: {error}", file=sys.stderr)
    if not solo or not loaded:
        sys.exit(f"error: no request answered (app log: {log_path})")
    text = report(args, description, load_start, solo, loaded, errors, wall, app_args, engine_text)
    section, begin, end = (ENGINE_SECTION, ENGINE_BEGIN, ENGINE_END) if args.backend else (SECTION, SECTION_BEGIN,
                                                                                          SECTION_END)
    print(f"{section}\n\n{text}")
    if args.write:
        replace_markdown_section(args.write, text, begin, end, heading=section)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
