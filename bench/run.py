"""Every benchmark in one run, written to docs/BENCHMARKS.md with a chart (docs/benchmarks.png).

    python bench/run.py               # `make bench`: every row (about 15 minutes on an idle 2-core CPU)
    python bench/run.py --quick       # smaller sizes, to check the pipeline (numbers not comparable)
Ratios are measured in one run on one machine. The '## Chat' section is bench/bench_chat.py's own (it
replaces just that section); this script regenerates everything else, with the chat figures in the goal table.
GPU rows come from bench/bench_gpu.py when CUDA is present; otherwise they say so.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import bench_train  # noqa: E402  (bench/ is on the path above)

DOC = ROOT / "docs" / "BENCHMARKS.md"
CHART = ROOT / "docs" / "benchmarks.png"
RESULTS = ROOT / "docs" / "benchmarks.json"
CHAT_SECTION = "## Chat"


def fmt_ratio(x):
    return f"{x:.2f}x"


def goal_rows(cpu, pre, tr, gpu, chat=None):
    """(area, what, goal, measured, met) for the summary table."""
    rows = []
    if pre:
        rows.append(("Preprocessing", f"cold, {pre['records']} records vs original ({pre['original_s']:.1f} s)",
                     ">= 3x", f"{fmt_ratio(pre['cold_speedup'])} ({pre['cold_s']:.2f} s)", pre["cold_speedup"] >= 3))
        rows.append(("Preprocessing", "warm (cached) vs original", ">= 50x",
                     f"{fmt_ratio(pre['warm_speedup'])} ({pre['warm_s'] * 1000:.0f} ms)", pre["warm_speedup"] >= 50))
        if "ranks_tokenizing" in pre:
            rows.append(("Preprocessing", f"ranks that tokenize under torchrun x{pre['nproc']}", "1",
                         str(pre["ranks_tokenizing"]), pre["ranks_tokenizing"] == 1))
    ok = {k: v for k, v in tr.items() if "error" not in v}
    for name, base_name in (("packing", "original"), ("packing_alpaca", "original_alpaca"),
                            ("group_by_length", "original"), ("packing", "padded")):
        r, base = ok.get(name), ok.get(base_name)
        if not (r and base):
            continue
        speed = r["supervised_tokens_s"] / base["supervised_tokens_s"]
        same_loss = abs(r["mean_loss_timed"] - base["mean_loss_timed"]) < 1e-2 or name == "group_by_length"
        data = "Alpaca (stage 1)" if r["data"] == "alpaca" else "GenMedGPT (stage 2)"
        against = "the original" if base_name.startswith("original") else "padded, same fused AdamW"
        ceiling = f"; FLOP ceiling {fmt_ratio(r['padded_to_packed_flops'])}" if name != "group_by_length" else ""
        rows.append(("Training", f"`{' '.join(r['flags'])}` supervised tok/s vs {against}, {data} (loss "
                     f"{r['mean_loss_timed']:.4f} vs {base['mean_loss_timed']:.4f}; padding waste "
                     f"{r['padding_waste']:.0%} vs {base['padding_waste']:.0%}{ceiling})", ">= 1.5x",
                     fmt_ratio(speed), (speed >= 1.5 and same_loss) if base_name.startswith("original") else None))
    if cpu and ok:
        for name in ("original", "packing", "packing_bf16"):
            r = ok.get(name)
            if r:
                # bf16 runs against the better of the two peaks: a slow bf16 path is no ceiling to measure against
                peak = max(cpu["matmul_bf16_flops"], cpu["matmul_fp32_flops"]) if r["bf16"] else cpu["matmul_fp32_flops"]
                mfu = r["model_flops_s"] / peak
                rows.append(("CPU", f"model FLOP/s share of the {'best' if r['bf16'] else 'fp32'} matmul peak, {name}",
                             ">= 40%", f"{mfu:.0%} ({r['model_flops_s'] / 1e9:.1f} / {peak / 1e9:.1f} GFLOP/s)",
                             None if r["bf16"] else mfu >= 0.4))  # bf16 is not what trains here: no verdict
        if "packing" in ok and "packing_bf16" in ok:
            a, b = ok["packing"], ok["packing_bf16"]
            rows.append(("CPU", "bf16 autocast vs fp32 (packing), tok/s; first timed step's loss",
                         "faster one is the default",
                         f"bf16 {fmt_ratio(b['tokens_s'] / a['tokens_s'])} of fp32 (loss {b['losses'][1]:.4f} "
                         f"vs {a['losses'][1]:.4f}); default: {'bf16' if b['tokens_s'] > a['tokens_s'] else 'fp32'}",
                         None))
        if "padded" in ok and "padded_gradient_checkpointing" in ok:
            a, b = ok["padded"], ok["padded_gradient_checkpointing"]
            rows.append(("CPU", "peak RSS, padded / with --gradient_checkpointing", "report",
                         f"{a['peak_rss_bytes'] / 2**30:.2f} / {b['peak_rss_bytes'] / 2**30:.2f} GiB "
                         f"(step time {fmt_ratio(b['seconds'] / a['seconds'])})", None))
    if chat:
        bound = chat["bound_tokens_s"]
        share, reachable = chat["decode_tokens_s"] / bound, chat["reachable_tokens_s"] / bound
        rows.append(("Chat", f"decode tokens/s vs the bandwidth bound ({bound:.0f} tok/s), `chat.py` default; plain "
                     f"`nn.Linear` {chat['decode_plain_tokens_s']:.1f} tok/s; eager ceiling with the measured per-token "
                     f"floor: {reachable:.0%}", ">= 60%", f"{share:.0%} ({chat['decode_tokens_s']:.1f} tok/s)",
                     share >= 0.6))
        if chat.get("decode_compiled_tokens_s"):
            compiled = chat["decode_compiled_tokens_s"] / bound
            rows.append(("Chat", f"decode tokens/s vs the bandwidth bound, `chat.py --compile` (compiling took "
                         f"{chat['compile_s']:.0f} s)", ">= 60%", f"{compiled:.0%} ({chat['decode_compiled_tokens_s']:.1f} "
                         "tok/s)", compiled >= 0.6))
        rows.append(("Chat", f"time to first token, turn {chat['ttft_turn']} / turn 1 with KV-cache reuse "
                     f"({fmt_ratio(chat['ttft_ratio_fresh'])} re-encoding)", "<= 1.5x",
                     fmt_ratio(chat["ttft_ratio_reuse"]), chat["ttft_ratio_reuse"] <= 1.5))
    else:
        rows.append(("Chat", "decode vs bandwidth bound; TTFT turn 10 / turn 1", ">= 60%; <= 1.5x", "not run", None))
    if gpu and "rows" in gpu:
        for r in gpu["rows"]:
            rows.append(("GPU", f"{r['name']} on {gpu['device']}", ">= 45% MFU",
                         f"{r['tokens_s']:.0f} tok/s, MFU {r['mfu']:.0%}", r["mfu"] >= 0.45))
    else:
        rows.append(("GPU", "seed command, ~1B LLaMA, FSDP + bf16 + tf32, seq 512", ">= 45% MFU",
                     "not measured: no GPU lent this session" if not gpu else gpu.get("reason", "not measured"), None))
    return rows


def chart(tr, pre, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if pre:
        names = ["original", "cold", "warm"]
        secs = [pre["original_s"], pre["cold_s"], pre["warm_s"]]
        axes[0].bar(names, secs, color=["grey", "tab:blue", "tab:green"])
        axes[0].set_ylabel("seconds (lower is better)")
        axes[0].set_title(f"Tokenize {pre['records']} GenMedGPT records")
        for i, s in enumerate(secs):
            axes[0].text(i, s, f"{s:.2f}s", ha="center", va="bottom")
    ok = [r for r in tr.values() if "error" not in r]
    if ok:
        names = [r["name"].replace("_", "\n") for r in ok]
        vals = [r["supervised_tokens_s"] for r in ok]
        colors = ["grey" if r["name"].startswith("original") else "tab:orange" if r["data"] == "alpaca" else "tab:blue"
                  for r in ok]
        axes[1].bar(names, vals, color=colors)
        axes[1].set_ylabel("supervised tokens / s (higher is better)")
        axes[1].set_title("Training step, SmolLM2-135M, CPU (orange: Alpaca)")
        axes[1].tick_params(axis="x", labelsize=7)
        for i, v in enumerate(vals):
            axes[1].text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine(cpu):
    import torch

    return (f"{cpu['cpu'] if cpu else platform.processor()} ({', '.join(cpu['cpu_flags']) if cpu else ''}), "
            f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def render(args, cpu, pre, tr, gpu, chat, load_start, load_end, started, minutes):
    import transformers

    lines = ["# Benchmarks", "",
             f"Command: `python bench/run.py{' --quick' if args.quick else ''}` (`make bench`), {started}, "
             f"{minutes:.1f} minutes.  ",
             f"Machine: {machine(cpu)}; transformers {transformers.__version__}.  ",
             f"Load: 1-minute load average {load_start:.1f} at start, {load_end:.1f} at the end "
             f"(`uptime`; {os.cpu_count()} cores). A load above the core count means other processes shared the "
             "CPU, so absolute figures are low and noisy; ratios are from the same run.  ",
             f"Raw results: [`docs/benchmarks.json`](benchmarks.json). Chart: ![benchmarks](benchmarks.png)", "",
             "## Goals", "", "| area | what | goal | measured | met |", "|---|---|---|---|---|"]
    for area, what, goal, measured, met in goal_rows(cpu, pre, tr, gpu, chat):
        mark = "" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {area} | {what} | {goal} | {measured} | {mark} |")
    if cpu:
        lines += ["", "## CPU limits (bench/bench_cpu.py)", "", "| | value |", "|---|---|",
                  f"| matmul fp32 (n={cpu['matmul_fp32_n']}, torch.mm, best of repeats) | {cpu['matmul_fp32_flops'] / 1e9:.1f} GFLOP/s |",
                  f"| matmul bf16 (n={cpu['matmul_bf16_n']}) | {cpu['matmul_bf16_flops'] / 1e9:.1f} GFLOP/s |",
                  f"| memory bandwidth (large tensor copy, read + write) | {cpu['memory_bandwidth_bytes_s'] / 1e9:.1f} GB/s |"]
    if pre:
        lines += ["", "## Preprocessing (bench/bench_preprocess.py)", "",
                  f"{pre['records']} GenMedGPT records, SmolLM2 fast tokenizer, max length 512, "
                  f"TOKENIZERS_PARALLELISM={pre['tokenizers_parallelism']}; best of repeats.", "",
                  "| method | seconds | vs original |", "|---|---|---|",
                  f"| original (two tokenizer calls per example, one at a time) | {pre['original_s']:.2f} | 1.00x |",
                  f"| cold: `utils.tokenize_supervised` (one batched pass with offsets) | {pre['cold_s']:.2f} | "
                  f"{fmt_ratio(pre['cold_speedup'])} |",
                  f"| warm: `utils.tokenize_cached` (hit) | {pre['warm_s']:.3f} | {fmt_ratio(pre['warm_speedup'])} |"]
        if "ranks_tokenizing" in pre:
            lines.append(f"\nUnder `torchrun --nproc_per_node {pre['nproc']}`, `train.tokenize` ran the tokenizer on "
                         f"{pre['ranks_tokenizing']} rank(s); the others read its cache "
                         f"(examples per rank: {pre['examples_per_rank']}).")
    if tr:
        any_r = next((r for r in tr.values() if "error" not in r), None)
        lines += ["", "## Training step (bench/bench_train.py)", ""]
        if any_r:
            lines.append(f"`train.py` on the embedded default (SmolLM2-135M, {any_r['n_params'] / 1e6:.0f}M parameters), "
                         f"first {args.train_records} records of GenMedGPT (stage 2) or Alpaca (stage 1, `*_alpaca`), "
                         f"batch {args.batch_size}, max length 512, {any_r['steps']} timed steps after 1 warm-up, same "
                         "seed (same examples in the same order except group_by_length), each configuration in its "
                         "own process. `original` is the original recipe: padded batches and unfused AdamW.")
        lines += ["", "| configuration | what | data | flags | supervised tok/s | all tok/s | padding waste | mean loss | "
                  "model GFLOP/s | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in tr.values():
            if "error" in r:
                lines.append(f"| {r['name']} | | | failed: {r['error']} | | | | | | |")
                continue
            flags = " ".join(r["flags"]) or "(defaults)"
            what = bench_train.DESCRIPTIONS.get(r["name"], "")
            lines.append(f"| {r['name']} | {what} | {r.get('data', 'genmedgpt')} | `{flags}` | "
                         f"{r['supervised_tokens_s']:.1f} | "
                         f"{r['tokens_s']:.1f} | "
                         f"{r['padding_waste']:.1%} | {r['mean_loss_timed']:.4f} | {r['model_flops_s'] / 1e9:.1f} | "
                         f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    lines += ["", "## How the figures are made", "",
              "- Training rows run `train.train()` with the flags shown, in a fresh process each (peak RSS is that "
              "process's `ru_maxrss`). Supervised tokens: positions with a label (the response, about a third of a "
              "GenMedGPT example). Padding waste: padded positions / computed positions.",
              "- `--packing` is transformers' `DataCollatorWithFlattening` (one row, position ids restarting per "
              "example) with three parts, each measured: `packing_block_mask` is flattening alone (transformers builds "
              "a block-diagonal causal mask, so one SDPA computes every token against the whole row); "
              "`packing_all_logits` adds `utils.packed_sdpa_attention`, one causal SDPA per example from the "
              "collator's `cu_seq_lens` (varlen attention where flash-attn is missing); `packing` adds "
              "`logits_to_keep` / `shift_labels`, so the 49k-vocabulary LM head runs only where a label is. The loss "
              "is the same sum over the same targets (equal to the padded loss in tests/test_packing.py and in the "
              "table).",
              "- FLOP ceiling: FLOPs of the padded batches over FLOPs of the same batches packed "
              "(`bench_train.padded_to_packed_flops`); at equal FLOP/s, the most packing can give on that data. "
              "GenMedGPT examples are alike in length (little padding at batch 4) and their responses are half the "
              "tokens, so its ceiling is low; Alpaca's lengths vary, so padding wastes far more.",
              "- `padded` vs `original`: the same batches, with this project's default `--optim adamw_torch_fused` "
              "(one fused kernel for the AdamW update) against the original's unfused AdamW. Every configuration "
              "steps the optimizer after each batch (no gradient accumulation), so the optimizer's share of a step "
              "is larger here than with the recipe's 8-step accumulation; `packing` vs `padded` is the batching alone.",
              "- `group_by_length` trains on other batches than the rest (the Trainer's sampler groups examples by "
              "length and puts the longest batch first), so its speed and loss are not on the same examples.",
              "- Model FLOPs are what a batch needs, however it is computed (`bench_train.flops_per_batch`): "
              "6 x body parameters x real tokens + 6 x LM-head parameters (the tied embedding, counted once) x "
              "supervised tokens + 6 x layers x hidden x length^2 per example (causal attention), forward and "
              "backward. Padding and logits nobody reads are not counted, so MFU is comparable across rows. "
              "MFU is that rate over the fp32 matmul peak measured in the same run (for bf16 runs, the better of the "
              "two peaks). The peak is the best of several repeats, so on a loaded machine it catches a quiet moment "
              "while the training steps run through the load: MFU reads low then.",
              "- bf16: this CPU has no bf16 instructions (no avx512_bf16 / amx), so bf16 matmuls take a slow path; "
              "train.py drops `--bf16` on such CPUs (`utils.cpu_has_native_bf16`) and trains in fp32."]
    lines += ["", "## GPU (bench/bench_gpu.py)", ""]
    if gpu and "rows" in gpu:
        lines += [f"Device: {gpu['device']}; bf16 peak {gpu['peak_flops'] / 1e12:.0f} TFLOP/s.", "",
                  "| configuration | tokens/s | MFU |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['tokens_s']:.0f} | {r['mfu']:.0%} |" for r in gpu["rows"]]
    else:
        lines.append("Not measured: no GPU lent this session. On a CUDA machine: `python bench/bench_gpu.py` "
                     "(or `make bench`, which runs it when CUDA is present).")
    return "\n".join(lines) + "\n"


def write_doc(args, cpu, pre, tr, gpu, chat, load_start, load_end, started, minutes):
    """docs/BENCHMARKS.md from the results; an existing '## Chat' section is kept as it is."""
    args.batch_size = 4
    chart(tr, pre, CHART)
    old = DOC.read_text() if DOC.exists() else ""
    chat_section = old[old.find(CHAT_SECTION + "\n"):] if CHAT_SECTION + "\n" in old else ""
    text = render(args, cpu, pre, tr, gpu, chat, load_start, load_end, started, minutes)
    DOC.write_text(text + ("\n" + chat_section if chat_section else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", default="", help="comma-separated: cpu,preprocess,train,chat,gpu")
    p.add_argument("--train_steps", type=int)
    p.add_argument("--from_json", action="store_true", help="re-render docs/BENCHMARKS.md from docs/benchmarks.json")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    args.batch_size = 4
    args.train_records = 256 if args.quick else 512
    steps = args.train_steps or (1 if args.quick else 4)
    if args.from_json:
        saved = json.loads(RESULTS.read_text())
        meta = saved["meta"]
        args.quick, args.train_records = meta["quick"], meta["train_records"]
        write_doc(args, saved["cpu"], saved["preprocess"], saved["train"], saved["gpu"], saved.get("chat"),
                  meta["load_start"], meta["load_end"], meta["started"], meta["minutes"])
        return
    t0, started, load_start = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]
    print(f"bench: load average {load_start:.1f} at start")

    cpu = pre = gpu = None
    tr = {}
    if "cpu" not in skip:
        import bench_cpu

        print("cpu limits ...", flush=True)
        cpu = bench_cpu.run(quick=args.quick)
    if "preprocess" not in skip:
        import bench_preprocess

        print("preprocessing ...", flush=True)
        pre = bench_preprocess.run(repeats=2 if args.quick else 3, records=1000 if args.quick else None)
    if "train" not in skip:
        print("training ...", flush=True)
        tr = bench_train.run(steps=steps, batch_size=args.batch_size, records=args.train_records)
    if "gpu" not in skip:
        import torch

        if torch.cuda.is_available():
            import bench_gpu

            gpu = bench_gpu.run(quick=args.quick)
    chat = None
    chat_script = ROOT / "bench" / "bench_chat.py"
    if "chat" not in skip:
        print("chat ...", flush=True)
        chat_json = RESULTS.with_name("benchmarks-chat.json")
        chat_json.unlink(missing_ok=True)
        cmd = [sys.executable, str(chat_script), "--write", str(DOC), "--json", str(chat_json)]
        if args.quick:
            cmd += ["--turns", "5", "--max_new_tokens", "16", "--decode_tokens", "32"]
        subprocess.run(cmd, cwd=ROOT, check=False)  # replaces the '## Chat' section, which write_doc keeps
        chat = json.loads(chat_json.read_text()) if chat_json.exists() else None
        chat_json.unlink(missing_ok=True)
    minutes, load_end = (time.perf_counter() - t0) / 60, os.getloadavg()[0]
    DOC.parent.mkdir(exist_ok=True)
    meta = {"quick": args.quick, "train_records": args.train_records, "load_start": load_start,
            "load_end": load_end, "started": started, "minutes": minutes}
    RESULTS.write_text(json.dumps({"cpu": cpu, "preprocess": pre, "train": tr, "gpu": gpu, "chat": chat, "meta": meta},
                                  indent=1))
    write_doc(args, cpu, pre, tr, gpu, chat, load_start, load_end, started, minutes)
    print(f"wrote {DOC} and {CHART} in {(time.perf_counter() - t0) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
