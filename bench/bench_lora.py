"""Training memory and speed with LoRA (train.py --lora_r 8) against full fine-tuning, on the embedded default.

    python bench/bench_lora.py                              # every configuration, prints JSON
    python bench/bench_lora.py --write docs/BENCHMARKS.md   # + the '## LoRA' section (bench/run.py does this)
    python bench/bench_lora.py --quick                      # smoke run: fewer records and steps (not comparable)
Each configuration runs bench/bench_train.py's worker: `train.train()` with the real flags in its own process (peak
RSS is that process's ru_maxrss, model loading included), on the same records in the same order, same batch and
length (`--packing True`, fp32), for 1 warm-up step plus --steps timed steps. LoRA takes `make demo LORA=1`'s flags.
Issue 13's goals on CPU: LoRA's peak memory <= 50% of full fine-tuning's, its tokens/s >= 1.3x.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import bench_train  # noqa: E402  (bench/ is on the path above)
import machine  # noqa: E402
from utils import replace_markdown_section, write_json_atomic  # noqa: E402

SECTION = "## LoRA"
SECTION_BEGIN = "<!-- bench/bench_lora.py: begin (generated; edits inside are overwritten) -->"
SECTION_END = "<!-- bench/bench_lora.py: end -->"
# --random_model: a section of its own, so that the embedded default's figures stay beside it.
SCALE_SECTION = "## LoRA on a larger LLaMA (random weights)"
SCALE_BEGIN = "<!-- bench/bench_lora.py --random_model: begin (generated; edits inside are overwritten) -->"
SCALE_END = "<!-- bench/bench_lora.py --random_model: end -->"
LORA_FLAGS = ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--learning_rate", "3e-4"]
CHECKPOINTING = ["--gradient_checkpointing", "True"]
# name -> train.py flags after bench_train's common ones. Beside the pair the goals are about: LoRA without its
# dropout (which keeps a dropped-out copy of each adapted layer's input for the backward pass), and both with
# gradient checkpointing (activations recomputed, so the weights and optimizer state are most of the memory).
CONFIGS = {
    "full": ["--packing", "True"],
    "lora": ["--packing", "True", *LORA_FLAGS],
    "lora_no_dropout": ["--packing", "True", *LORA_FLAGS, "--lora_dropout", "0"],
    "full_checkpointing": ["--packing", "True", *CHECKPOINTING],
    "lora_checkpointing": ["--packing", "True", *LORA_FLAGS, *CHECKPOINTING],
}
PAIRS = (("lora", "full"), ("lora_no_dropout", "full"), ("lora_checkpointing", "full_checkpointing"))
GOAL_MEMORY, GOAL_SPEED = 0.5, 1.3  # LoRA / full: peak RSS at most, tokens/s at least


def worker(name, args, out_path):
    """bench_train's worker (which also counts the parameters that train) on this file's configurations."""
    bench_train.CONFIGS = CONFIGS
    bench_train.worker(name, args, out_path)


def run(args, log=print):
    """Each configuration in a fresh process, all with the same settings; {name: result}."""
    settings = ["--steps", str(args.steps), "--batch_size", str(args.batch_size), "--records", str(args.records),
                "--max_length", str(args.max_length), "--model", args.model]
    settings += (["--threads", str(args.threads)] if args.threads else []) + \
        (["--data_path", args.data_path] if args.data_path else [])
    results = {}
    for name in args.configs.split(",") if args.configs else CONFIGS:
        flags = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(out), *settings]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                log(f"lora bench {name} failed:\n{proc.stderr[-3000:]}")
                results[name] = {"name": name, "flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
                continue
            results[name] = r = json.loads(out.read_text())
            log(f"  {name}: {r['tokens_s']:.1f} tok/s, {r['trainable_params']:,} trainable parameters, peak RSS "
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, loss {r['mean_loss_timed']:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    return results


def training_memory(result):
    """What training adds to the loaded model: peak RSS minus the RSS when training began (optimizer state,
    gradients, activations), without the interpreter, libraries and frozen weights every configuration holds."""
    return result["peak_rss_bytes"] - result["rss_at_train_begin_bytes"]


def goals(results):
    """(what, goal, measured, met) rows for each pair of PAIRS that ran."""
    rows = []
    for lora_name, full_name in PAIRS:
        lora, full = results.get(lora_name, {}), results.get(full_name, {})
        if "error" in full or "error" in lora or not (full and lora):
            continue
        memory = lora["peak_rss_bytes"] / full["peak_rss_bytes"]
        added = training_memory(lora) / training_memory(full)
        speed = lora["tokens_s"] / full["tokens_s"]
        pair = f"`{lora_name}` / `{full_name}`"
        rows += [(f"peak RSS, {pair}", f"<= {GOAL_MEMORY:.0%}", f"{memory:.0%} ({lora['peak_rss_bytes'] / 2**30:.2f} / "
                  f"{full['peak_rss_bytes'] / 2**30:.2f} GiB)", memory <= GOAL_MEMORY),
                 (f"memory training adds, {pair}", f"<= {GOAL_MEMORY:.0%}", f"{added:.0%} "
                  f"({training_memory(lora) / 2**30:.2f} / {training_memory(full) / 2**30:.2f} GiB)",
                  added <= GOAL_MEMORY),
                 (f"tokens/s, {pair}", f">= {GOAL_SPEED:.1f}x",
                  f"{speed:.2f}x ({lora['tokens_s']:.1f} / {full['tokens_s']:.1f} tok/s)", speed >= GOAL_SPEED)]
    return rows


def render(args, results, description, load_start, load_end, started, minutes):
    """The '## LoRA' section's text (without its heading), from this run's figures and `description`."""
    any_r = next((r for r in results.values() if "error" not in r), {})
    shown = [a for a, before in zip(sys.argv[1:], [""] + sys.argv[1:]) if a not in ("--write", "--json")
             and before not in ("--write", "--json")]  # where the output goes is not how it was measured
    command = " ".join(["python bench/bench_lora.py", *shown])
    lines = [f"Command: `{command}` (`make bench` runs it without flags), "
             f"{started}, {minutes:.1f} minutes.  ",
             f"Machine: {machine.summary(description)}.  ",
             f"Load: 1-minute load average {load_start:.1f} at start, {load_end:.1f} at the end "
             f"({description['cores']} cores)" + ("; above the core count, other processes shared the CPU and "
                                                   "absolute figures are low." if max(load_start, load_end) >
                                                   description["cores"] else "."), "",
             "`train.py --packing True` on "
             + (f"a randomly initialised LLaMA (hidden, MLP, layers: {args.random_model}; the embedded default's "
                "tokenizer" if args.random_model else "the embedded default (SmolLM2-135M")
             + (f", {any_r['n_params'] / 1e6:.0f}M parameters" if any_r else "") + f"), fp32, first {args.records} "
             f"GenMedGPT records, batch {args.batch_size}, max length {args.max_length}, {args.steps} timed step(s) "
             "after 1 warm-up, each configuration in its own process; LoRA with `make demo LORA=1`'s flags "
             f"(`{' '.join(LORA_FLAGS)}`) on every attention and MLP projection. Peak RSS is the process's "
             "`ru_maxrss` (model loading included); the memory training adds is that peak minus the process's RSS when "
             "training began, with the model loaded (all its weights read into memory).", "",
             "| goal | target | measured | met |", "|---|---|---|---|"]
    rows = goals(results)
    for what, goal, measured, met in rows:
        lines.append(f"| {what} | {goal} | {measured} | {'yes' if met else '**no**'} |")
    if not rows:
        lines.append("| LoRA vs full fine-tuning | | not measured: a configuration failed (below) | |")
    lines += ["", "| configuration | flags | parameters that train | tok/s | supervised tok/s | peak RSS | "
              "memory training adds | mean loss |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        flags = " ".join(r["flags"])
        if "error" in r:
            lines.append(f"| {name} | `{flags}` | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {name} | `{flags}` | {r['trainable_params']:,} | {r['tokens_s']:.1f} | "
                     f"{r['supervised_tokens_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{training_memory(r) / 2**30:.2f} GiB | {r['mean_loss_timed']:.4f} |")
    lines += ["", "`lora` is what `make demo LORA=1` trains with; the issue's goals are about it against `full`. "
              "`lora_no_dropout` shows what `--lora_dropout` costs: peft keeps a dropped-out copy of each adapted "
              "layer's input (and its mask) for the backward pass. The `*_checkpointing` pair shows the two with "
              "activations recomputed (`--gradient_checkpointing True`), where weights, gradients and optimizer "
              "state are most of the memory. The losses are not a quality comparison: a few steps at different "
              "learning rates (2e-5 full, 3e-4 LoRA)."]
    return "\n".join(lines) + "\n"


def make_random_llama(shape, out_dir, tokenizer_dir=bench_train.MODEL):
    """A randomly initialised LLaMA of `shape` ("hidden,intermediate,layers"; heads of 64, 3 per KV head as in
    SmolLM2) with the embedded default's tokenizer: memory and speed need the architecture, not trained weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers = (int(x) for x in shape.split(","))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    heads = hidden // 64
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 records, 1 timed step, max length 256")
    bench_train.add_run_arguments(p, CONFIGS, "instead of GenMedGPT's training split")
    p.add_argument("--write", help="markdown file whose '## LoRA' section gets the results")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--random_model", metavar="HIDDEN,INTERMEDIATE,LAYERS",
                   help="a randomly initialised LLaMA of this shape instead of --model (e.g. 1536,4096,16: 0.5B)")
    args = p.parse_args()
    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        return worker(args.worker, args, args.out)
    if args.quick:
        args.steps, args.records, args.max_length = 1, 64, 256
    description, load_start = machine.describe(), os.getloadavg()[0]
    if args.threads:
        description["torch_threads"] = args.threads  # what the workers ran with
    started, t0 = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    print(f"lora bench: load average {load_start:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_model:
            args.model = make_random_llama(args.random_model, Path(tmp) / "random-llama")
        results = run(args)
    minutes, load_end = (time.perf_counter() - t0) / 60, os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    text = render(args, results, description, load_start, load_end, started, minutes)
    section, begin, end = (SCALE_SECTION, SCALE_BEGIN, SCALE_END) if args.random_model else \
        (SECTION, SECTION_BEGIN, SECTION_END)
    print(f"{section}\n\n{text}")
    if args.write:
        replace_markdown_section(args.write, text, begin, end, heading=section)
    if args.json:
        write_json_atomic(args.json, {"description": description, "results": results})


if __name__ == "__main__":
    main()
