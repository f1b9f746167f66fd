"""Chat speed and prompt style, with the embedded default (or any --model_path).

    python bench/bench_chat.py                                  # print the tables
    python bench/bench_chat.py --styles 20 --write docs/BENCHMARKS.md   # + prompt styles, into the '## Chat' section
    python bench/bench_chat.py --knowledge format_dataset.csv   # + the dialogue grounded in the disease database

Decode: greedy tokens/s once the prompt is encoded, against the memory-bandwidth bound (every weight is read
once per token, so tokens/s <= bandwidth / weight bytes; bandwidth from a large torch copy).
Dialogue: time to first token at turns 1, 5 and 10 of one greedy conversation (held-out questions), with the
KV cache kept between turns and with everything re-encoded each turn; with --knowledge, the same dialogue
grounded in retrieved entries (issue 12's goal: turn 10 / turn 1 <= 1.5x, retrieval <= 50 ms a turn).
Styles: ROUGE-L F1 of single-turn answers against the held-out reference, per --prompt_style.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import chat  # noqa: E402
import knowledge  # noqa: E402
import machine  # noqa: E402
import prompts  # noqa: E402
from utils import load_data, load_model_and_tokenizer, relative, replace_markdown_section, write_json_atomic  # noqa: E402

SECTION = "## Chat"
SECTION_BEGIN = "<!-- bench/bench_chat.py: begin (generated; edits inside are overwritten) -->"
SECTION_END = "<!-- bench/bench_chat.py: end -->"


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights count once


def decode_speed(model, tokenizer, new_tokens=128, repeats=3, static_cache=False):
    """Greedy decode tokens/s between the first and the last new token (prompt encoding excluded)."""
    import torch
    from transformers import StaticCache

    ids = tokenizer(prompts.build_chat_prompt([("Patient", "I have a fever and a cough.")], "alpaca"),
                    return_tensors="pt")["input_ids"]
    rates = []
    for _ in range(repeats):
        stamps = []
        streamer = type("Clock", (), {"put": lambda self, v: stamps.append(time.perf_counter()), "end": lambda self: 0})()
        cache = StaticCache(config=model.config, max_cache_len=chat.COMPILED_CONTEXT) if static_cache else None
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, streamer=streamer, pad_token_id=tokenizer.eos_token_id,
                           cache=cache)
        rates.append((len(stamps) - 2) / (stamps[-1] - stamps[1]))  # stamps[0] is the prompt
    return max(rates)


def forward_speed(model, tokens=64):
    """The model's own single-token forward with a KV cache, without generate() around it."""
    import torch
    from transformers import DynamicCache

    cache, token = DynamicCache(config=model.config), torch.tensor([[1]])
    with torch.no_grad():
        model(input_ids=torch.tensor([list(range(10, 40))]), cache=cache, use_cache=True)
        start = time.perf_counter()
        for _ in range(tokens):
            model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
    return tokens / (time.perf_counter() - start)


def compiled_decode_speed(model, tokenizer, new_tokens):
    """chat.py --compile: (seconds the first, compiling call took, decode tokens/s after it)."""
    chat.compile_decoding(model)
    start = time.perf_counter()
    decode_speed(model, tokenizer, 4, repeats=1, static_cache=True)
    compile_s = time.perf_counter() - start
    speed = decode_speed(model, tokenizer, new_tokens, static_cache=True)
    model.generation_config.compile_config, model.generation_config.disable_compile = None, True
    return compile_s, speed


def eager_ceiling(bound, floor_s):
    """Tokens/s with every weight read at full bandwidth (`bound`) plus the per-token floor."""
    return 1 / (1 / bound + floor_s)


def overhead_floor(model, tokens=64):
    """Seconds per decoded token of the same architecture (layers, heads, attention, cache) with near-zero
    weights: what PyTorch and the modelling code cost per token before any weight is read."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    heads = config.num_attention_heads
    config.head_dim = 4
    config.hidden_size, config.intermediate_size, config.vocab_size = heads * 4, 32, 256
    tiny = AutoModelForCausalLM.from_config(config).eval()
    forward_speed(tiny, 8)  # warm-up
    return 1 / forward_speed(tiny, tokens)


def dialogue_timings(model, tokenizer, questions, reuse, max_new_tokens, knowledge_base=None):
    """Per turn: (prompt tokens, seconds to first token, seconds spent after the answer on the next prefix,
    seconds of retrieval within the first-token time)."""
    c = chat.Chat(model, tokenizer, prompts.DEFAULT_PROMPT_STYLE, {"do_sample": False, "max_new_tokens": max_new_tokens,
                                                               "repetition_penalty": 1.1}, reuse_cache=reuse,
                  knowledge=knowledge_base)
    c.respond(questions[0])  # warm-up: the first call of a process pays one-time costs
    c.reset()
    rows = []
    for question in questions:
        c.respond(question)
        rows.append((c.stats["prompt_tokens"], c.stats["first_token_s"], c.stats["next_prefix_s"],
                     c.stats["retrieval_s"]))
    return rows, [text for role, text in c.turns if role == "ChatDoctor"]


def style_scores(model, tokenizer, records, max_new_tokens, repetition_penalty):
    from eval import rouge_l_scores

    scores = {}
    for style in ("chatdoctor", "alpaca"):
        answers = []
        for record in records:
            c = chat.Chat(model, tokenizer, style, {"do_sample": False, "max_new_tokens": max_new_tokens,
                                                   "repetition_penalty": repetition_penalty}, reuse_cache=False)
            answers.append(c.respond(record["input"]))
        rouge = rouge_l_scores(answers, [r["output"] for r in records])
        scores[style] = (statistics.mean(rouge), sum(1 for a in answers if not a) / len(answers),
                         statistics.mean(len(a.split()) for a in answers))
    return scores


def report(args, description, load_start, bandwidth, weights, decode, forward, plain, floor, compiled, timings, styles,
           layers, grounded=None):
    """The '## Chat' section's text (without its heading). Every sentence about the hardware is from `description`
    (machine.describe) and the rates measured in this run."""
    bound = bandwidth / weights
    reachable = eager_ceiling(bound, floor)
    command = " ".join(["python bench/bench_chat.py"] + [relative(a) for a in sys.argv[1:]])
    threads = description["torch_threads"]
    lines = [f"`{command}` on {machine.summary(description)}, load average {load_start:.1f} at start; model "
             f"`{relative(args.model_path)}` ({weights / 1e6:.0f} MB of float32 weights), {time.strftime('%Y-%m-%d')}.",
             "",
             "| decode (greedy, after the prompt) | value |", "|---|---|",
             f"| memory bandwidth (torch copy, read + write) | {bandwidth / 1e9:.1f} GB/s |",
             f"| bound: bandwidth / weight bytes | {bound:.1f} tokens/s |",
             f"| model forward alone (1 token, KV cache), plain `nn.Linear` | {plain['forward']:.1f} tokens/s "
             f"({plain['forward'] / bound:.0%} of bound) |",
             f"| `generate()`, plain `nn.Linear` | {plain['generate']:.1f} tokens/s ({plain['generate'] / bound:.0%} of bound) |",
             f"| model forward alone, with `chat.split_cpu_gemv` | {forward:.1f} tokens/s ({forward / bound:.0%} of bound) |",
             f"| `generate()` as chat.py runs it (with `split_cpu_gemv`) | {decode:.1f} tokens/s "
             f"({decode / bound:.0%} of bound) |",
             f"| `generate()` as `chat.py --compile` runs it (static cache of {chat.COMPILED_CONTEXT}, compiled "
             f"step; compiling took {compiled[0]:.0f} s) | {compiled[1]:.1f} tokens/s ({compiled[1] / bound:.0%} of "
             f"bound) |",
             f"| per-token floor: same architecture, near-zero weights, eager | {floor * 1000:.1f} ms/token |",
             f"| reachable eagerly: weights at full bandwidth + the floor | {reachable:.1f} tokens/s "
             f"({reachable / bound:.0%} of bound) |", "",
             f"One decoded token runs many small PyTorch ops through the model's {layers} layers; the floor row is "
             "their cost alone, and no faster weight reading can go below it. Read as a rate, the plain one-row "
             f"matmuls of the model forward took its weights at {plain['forward'] * weights / 1e9:.1f} GB/s "
             f"({plain['forward'] * weights / bandwidth:.0%} of the copy bandwidth); `chat.split_cpu_gemv`, which "
             f"runs each as a batched matmul over {threads} row blocks of the weight ({threads} torch threads here), "
             f"took them at {forward * weights / 1e9:.1f} GB/s, and chat.py does that on CPU. `--compile` runs each "
             "decoding step as one compiled graph, which removes most of the floor, at the price of compiling on "
             "the first answer and of attending over the whole static cache at every step.", "",
             f"Time to first token in one greedy {prompts.DEFAULT_PROMPT_STYLE}-style dialogue of held-out questions "
             f"(answers up to {args.max_new_tokens} tokens become the history):", "",
             "| turn | prompt tokens | first token, cache reused | first token, re-encoded | "
             "after the answer: next prefix encoded |", "|---|---|---|---|---|"]
    reuse, fresh = timings
    for turn in (1, 5, 10):
        if turn <= len(reuse):
            (n, t_reuse, t_prefix, _), (_, t_fresh, _, _) = reuse[turn - 1], fresh[turn - 1]
            lines.append(f"| {turn} | {n} | {t_reuse * 1000:.0f} ms | {t_fresh * 1000:.0f} ms | {t_prefix * 1000:.0f} ms |")
    if load_start > (os.cpu_count() or 1):
        lines[2:2] = ["Other jobs shared the CPU during this run (load average above the core count): absolute speeds",
                      "are low and noisy, and the decode share of the bound is not the idle machine's. Rerun on an",
                      "idle machine for those; the with/without-reuse ratios hold either way.", ""]
    last = min(10, len(reuse))
    lines += ["", f"Turn {last} / turn 1, first token: {reuse[last - 1][1] / reuse[0][1]:.2f}x with reuse, "
              f"{fresh[last - 1][1] / fresh[0][1]:.2f}x re-encoding."]
    if grounded:
        lines += ["", f"The same dialogue with `--knowledge {args.knowledge}` (k={knowledge.DEFAULT_K} entries placed "
                  "with the newest message, cache reused):", "",
                  "| turn | prompt tokens | first token | of which retrieval |", "|---|---|---|---|"]
        for turn in (1, 5, 10):
            if turn <= len(grounded):
                n, t_first, _, t_retrieval = grounded[turn - 1]
                lines.append(f"| {turn} | {n} | {t_first * 1000:.0f} ms | {t_retrieval * 1000:.0f} ms |")
        retrieval_ms = sorted(row[3] * 1000 for row in grounded)
        lines += ["", f"Turn {min(10, len(grounded))} / turn 1, first token with knowledge: "
                  f"{grounded[min(10, len(grounded)) - 1][1] / grounded[0][1]:.2f}x; retrieval per turn "
                  f"{statistics.median(retrieval_ms):.0f} ms median, {retrieval_ms[-1]:.0f} ms max."]
    if styles:
        lines += ["", f"Prompt style, {args.styles} held-out GenMedGPT records spread over the file, single turn, "
                  f"greedy, up to {args.style_tokens} new tokens; ROUGE-L F1 against the reference answer:", "",
                  "| repetition penalty | style | ROUGE-L | empty answers | mean words |", "|---|---|---|---|---|"]
        for penalty, scores in styles.items():
            for style, (rouge, empty, length) in scores.items():
                lines.append(f"| {penalty} | {style} | {rouge:.3f} | {empty:.0%} | {length:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--data_path", default=str(ROOT / "data" / "genmedgpt_heldout.json"))
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=64, help="answer length in the dialogue")
    p.add_argument("--decode_tokens", type=int, default=128)
    p.add_argument("--styles", type=int, default=0, help="held-out records for the prompt-style comparison (0: skip)")
    p.add_argument("--style_tokens", type=int, default=96)
    p.add_argument("--style_penalties", default="1.1,1.0", help="repetition penalties for the style comparison")
    p.add_argument("--knowledge", help="also time the dialogue grounded in this knowledge (e.g. format_dataset.csv)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--write", help="markdown file whose '## Chat' section gets the results")
    p.add_argument("--json", help="also write the headline figures here (bench/run.py's goal table reads them)")
    args = p.parse_args()

    import torch
    from compare import spread_indices

    if args.threads:
        torch.set_num_threads(args.threads)

    description, load_start = machine.describe(), os.getloadavg()[0]
    model, tokenizer = load_model_and_tokenizer(args.model_path, dtype=torch.float32)
    model.eval()
    records = load_data(args.data_path)
    bandwidth, weights = machine.memory_bandwidth(), weight_bytes(model)
    plain = {"forward": forward_speed(model), "generate": decode_speed(model, tokenizer, args.decode_tokens)}
    chat.split_cpu_gemv(model)  # what chat.py does on CPU
    forward = forward_speed(model)
    decode = decode_speed(model, tokenizer, args.decode_tokens)
    floor = overhead_floor(model)
    compile_s, compiled = compiled_decode_speed(model, tokenizer, args.decode_tokens)
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s, bound {bandwidth / weights:.1f} tok/s, "
          f"forward {plain['forward']:.1f} -> {forward:.1f} tok/s, generate {plain['generate']:.1f} -> {decode:.1f} "
          f"tok/s, overhead floor {floor * 1000:.1f} ms/token, --compile {compiled:.1f} tok/s "
          f"(compiling took {compile_s:.0f} s)", flush=True)
    questions = [records[i]["input"] for i in spread_indices(len(records), args.turns)]
    reuse, answers_reuse = dialogue_timings(model, tokenizer, questions, True, args.max_new_tokens)
    fresh, answers_fresh = dialogue_timings(model, tokenizer, questions, False, args.max_new_tokens)
    if answers_reuse != answers_fresh:
        print("warning: answers differ with and without cache reuse", file=sys.stderr)
    grounded = None
    if args.knowledge:
        grounded, _ = dialogue_timings(model, tokenizer, questions, True, args.max_new_tokens,
                                       knowledge.load_knowledge(args.knowledge))
    styles = {}
    if args.styles:
        picked = [records[i] for i in spread_indices(len(records), args.styles)]
        penalties = [float(x) for x in args.style_penalties.split(",")]
        styles = {penalty: style_scores(model, tokenizer, picked, args.style_tokens, penalty) for penalty in penalties}
    text = report(args, description, load_start, bandwidth, weights, decode, forward, plain, floor,
                  (compile_s, compiled), (reuse, fresh), styles, model.config.num_hidden_layers, grounded)
    print(f"{SECTION}\n\n{text}")
    if args.write:
        replace_markdown_section(args.write, text, SECTION_BEGIN, SECTION_END, heading=SECTION)
    if args.json:
        bound, last = bandwidth / weights, min(10, len(reuse))
        write_json_atomic(args.json, {
            "bound_tokens_s": bound, "decode_tokens_s": decode, "decode_plain_tokens_s": plain["generate"],
            "decode_compiled_tokens_s": compiled, "compile_s": compile_s,
            "floor_s": floor, "reachable_tokens_s": eager_ceiling(bound, floor), "ttft_turn": last,
            "ttft_ratio_reuse": reuse[last - 1][1] / reuse[0][1], "ttft_ratio_fresh": fresh[last - 1][1] / fresh[0][1],
            **({"ttft_ratio_knowledge": grounded[last - 1][1] / grounded[0][1],
                "retrieval_ms_median": statistics.median(row[3] * 1000 for row in grounded)} if grounded else {}),
        })


if __name__ == "__main__":
    main()
