"""One user, in-process against a serving engine: decode speed, and whether greedy answers are the same.

    python bench/bench_serving.py                                        # embedded model, its f16 GGUF, print
    python bench/bench_serving.py --questions 20 --write docs/BENCHMARKS.md   # into '## One user over a serving engine'

Exports --model_path to GGUF (export_gguf.py, --type) unless --gguf is given, starts llama.cpp's server over it on
a free loopback port (serve.py), and asks the same held-out GenMedGPT questions through chat.py's engine twice:
in-process (chat.Chat, transformers) and through the engine (chat.BackendChat, the completions API with the same
prompt). Both greedy. Decode: tokens/s between the first and the last piece of each answer (the prompt excluded),
the median over the questions. Equality: per repetition penalty, how many answers are the same text, and for the
others how many words they share before they part.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTION = "## One user over a serving engine"
SECTION_BEGIN = "<!-- bench/bench_serving.py: begin (generated; edits inside are overwritten) -->"
SECTION_END = "<!-- bench/bench_serving.py: end -->"


def answers(conversation_of, questions, penalty, max_new_tokens):
    """[(answer, decode tokens/s or None)] of each question, each in a fresh conversation."""
    import chat

    out = []
    for question in questions:
        conversation = conversation_of(chat.GenerationSettings(greedy=True, repetition_penalty=penalty,
                                                               max_new_tokens=max_new_tokens))
        conversation.respond(question)
        stats = conversation.stats
        decode_s = stats["answer_s"] - stats["first_token_s"]
        rate = (stats["new_tokens"] - 1) / decode_s if stats["new_tokens"] > 8 and decode_s > 0 else None
        out.append((conversation.turns[-1][1], rate))
    return out


def shared_words(a, b):
    n = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        n += 1
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--gguf", help="its GGUF export (default: exported here to a temporary folder)")
    p.add_argument("--type", default="f16", choices=("f16", "q8_0"), help="the export's weight type")
    p.add_argument("--data_path", default=str(ROOT / "data" / "genmedgpt_heldout.json"))
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--penalties", type=float, nargs="+", default=[1.1, 1.0],
                   help="repetition penalties to compare at (1.1: chat.py's default)")
    p.add_argument("--engine_threads", type=int, default=None, help="the engine's threads (serve.py's default)")
    p.add_argument("--write", help="markdown file whose section gets the results")
    args = p.parse_args()

    import chat
    import export_gguf
    import machine
    import serve
    from bench_app import free_port
    from utils import load_data, relative, replace_markdown_section

    records = load_data(args.data_path)
    questions = list(dict.fromkeys(" ".join(r["input"].split()) for r in records))[:args.questions]
    description, load_start = machine.describe(), os.getloadavg()[0]
    gguf = args.gguf or export_gguf.export(args.model_path, Path(tempfile.mkdtemp()) / "model.gguf", args.type)["out"]
    port, log = free_port(), Path(tempfile.mkdtemp()) / "engine.log"
    engine_process = serve.start_engine(gguf, port, log, args.engine_threads)
    try:
        serve.wait_engine(engine_process, port, log)
        local = chat.load_engine(chat.EngineSettings(model_path=args.model_path, device="cpu"), sys.stderr)
        remote = chat.load_engine(chat.EngineSettings(model_path=args.model_path, backend=serve.engine_url(port),
                                                      model=serve.MODEL_NAME), sys.stderr)
        results = {}
        for penalty in args.penalties:
            for name, engine in (("in-process", local), ("engine", remote)):
                answers(engine.new_chat, questions[:1], penalty, 8)  # warm-up: one-time costs out of the figures
                results[name, penalty] = answers(engine.new_chat, questions, penalty, args.max_new_tokens)
                print(f"{name}, repetition penalty {penalty}: done", file=sys.stderr)
    finally:
        serve.stop_engine(engine_process)

    command = " ".join(["python bench/bench_serving.py"] + sys.argv[1:])
    lines = [f"`{command}` on {machine.summary(description)}, load average {load_start:.1f} at start; "
             f"`{relative(args.model_path)}` in-process (transformers, `chat.Chat`) and as {args.type} GGUF "
             f"in llama-cpp-python's server (serve.py, {args.engine_threads or serve.default_threads()} thread(s)) "
             f"through `chat.BackendChat`; {len(questions)} held-out "
             f"GenMedGPT questions, greedy, up to {args.max_new_tokens} new tokens, {time.strftime('%Y-%m-%d')}.",
             "", "| repetition penalty | decode tokens/s in-process | through the engine | ratio | same answer "
                 "| words shared before the first difference (median, where different) |",
             "|---|---|---|---|---|---|"]
    for penalty in args.penalties:
        mine, theirs = results["in-process", penalty], results["engine", penalty]
        rates = [statistics.median([r for _, r in side if r] or [0]) for side in (mine, theirs)]
        same = sum(a == b for (a, _), (b, _) in zip(mine, theirs))
        parted = [shared_words(a, b) for (a, _), (b, _) in zip(mine, theirs) if a != b]
        lines.append(f"| {penalty:g} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / max(rates[0], 1e-9):.1f}x "
                     f"| {same} / {len(questions)} | {statistics.median(parted) if parted else '-'} |")
    if load_start > (os.cpu_count() or 1):
        lines += ["", "Other jobs shared the CPU during this run (load average above the core count): the times are "
                  "slower and noisier than an idle machine's; rerun on an idle machine for the figures to quote."]
    text = "\n".join(lines) + "\n"
    print(f"{SECTION}\n\n{text}")
    if args.write:
        replace_markdown_section(args.write, text, SECTION_BEGIN, SECTION_END, heading=SECTION)
    for penalty in args.penalties:  # the first difference, for the reader who wants to see it
        for (a, _), (b, _) in zip(results["in-process", penalty], results["engine", penalty]):
            if a != b:
                print(f"penalty {penalty:g}, first different answer:\n  in-process: {a[:300]!r}\n  engine:     "
                      f"{b[:300]!r}", file=sys.stderr)
                break
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    sys.exit(main())
