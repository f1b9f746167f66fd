"""Every benchmark in one run, written to docs/BENCHMARKS.md with a chart (docs/benchmarks.png).

    python bench/run.py               # `make bench`: every row (about 15 minutes on an idle 2-core CPU)
    python bench/run.py --repeats 3   # every row three times: the median with the min-max beside each figure
    python bench/run.py --quick       # smaller sizes, to check the pipeline (numbers not comparable)
Ratios are measured in one run on one machine. The '## Chat' section is bench/bench_chat.py's own (it
replaces just that section, with the last run's figures); this script regenerates its own section before it,
with the chat figures in the goal table. GPU rows come from bench/bench_gpu.py when CUDA is present;
otherwise they say so. The '## LoRA' section is bench/bench_lora.py's own, like '## Chat'. The machine is
described from /proc/cpuinfo and measurement (machine.py).
"""
import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import bench_train  # noqa: E402  (bench/ is on the path above)
import machine  # noqa: E402
from utils import replace_markdown_section, write_atomic, write_json_atomic  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
CHART = ROOT / "docs" / "benchmarks.png"
RESULTS = ROOT / "docs" / "benchmarks.json"
SECTION_BEGIN = "<!-- bench/run.py: begin (generated; edits inside are overwritten) -->"
SECTION_END = "<!-- bench/run.py: end -->"
RUN_KEYS = ("cpu", "preprocess", "train", "gpu", "chat")  # one run of every benchmark


def fmt_ratio(x):
    return f"{x:.2f}x"


def fmt_percent(x):
    return f"{x:.0%}"


def _values(runs, value):
    """value(run) for each run where it can be computed (a row that failed in one run is left out)."""
    found = []
    for run in runs:
        try:
            v = value(run)
        except (KeyError, TypeError, ZeroDivisionError, StopIteration):
            continue
        if v is not None:
            found.append(v)
    return sorted(found)


def median(runs, value):
    """The median over the runs (the lower middle one of an even count), None where no run has it."""
    values = _values(runs, value)
    return values[(len(values) - 1) // 2] if values else None


def spread(runs, value, fmt):
    """(median, its text): with several runs the min-max over them stands beside it, e.g. '1.43x [1.25-1.43x]'."""
    values = _values(runs, value)
    if not values:
        return None, "n/a"
    mid = values[(len(values) - 1) // 2]
    text = fmt(mid)
    if len(values) > 1:
        text += f" [{fmt(values[0])}-{fmt(values[-1])}]"
    return mid, text


def figure(runs, value, fmt):
    return spread(runs, value, fmt)[1]


def goal_rows(runs):
    """(area, what, goal, measured, met) for the summary table, from one or more runs of every benchmark.
    `measured` is the median over the runs with the min-max beside it (one run: just its figure); what does not
    change between runs (losses, padding waste, FLOP ceilings: same seed, same data) is the first run's."""
    first = runs[0]
    cpu, pre, tr, gpu, chat = (first[k] for k in RUN_KEYS)
    rows = []
    if pre:
        cold, cold_text = spread(runs, lambda r: r["preprocess"]["cold_speedup"], fmt_ratio)
        rows.append(("Preprocessing", f"cold, {pre['records']} records vs original "
                     f"({median(runs, lambda r: r['preprocess']['original_s']):.1f} s)", ">= 3x",
                     f"{cold_text} ({median(runs, lambda r: r['preprocess']['cold_s']):.2f} s)", cold >= 3))
        warm, warm_text = spread(runs, lambda r: r["preprocess"]["warm_speedup"], fmt_ratio)
        rows.append(("Preprocessing", "warm (cached) vs original", ">= 50x",
                     f"{warm_text} ({median(runs, lambda r: r['preprocess']['warm_s']) * 1000:.0f} ms)", warm >= 50))
        if "ranks_tokenizing" in pre:
            rows.append(("Preprocessing", f"ranks that tokenize under torchrun x{pre['nproc']}", "1",
                         str(pre["ranks_tokenizing"]), pre["ranks_tokenizing"] == 1))
    ok = {k: v for k, v in tr.items() if "error" not in v}

    def train_value(name, key):
        return lambda run: run["train"][name][key]

    for name, base_name in (("packing", "original"), ("packing_alpaca", "original_alpaca"),
                            ("group_by_length", "original"), ("packing", "padded")):
        r, base = ok.get(name), ok.get(base_name)
        if not (r and base):
            continue
        speed, speed_text = spread(runs, lambda run, n=name, b=base_name: run["train"][n]["supervised_tokens_s"]
                                   / run["train"][b]["supervised_tokens_s"], fmt_ratio)
        same_loss = abs(r["mean_loss_timed"] - base["mean_loss_timed"]) < 1e-2 or name == "group_by_length"
        data = "Alpaca (stage 1)" if r["data"] == "alpaca" else "GenMedGPT (stage 2)"
        against = "the original" if base_name.startswith("original") else "padded, same fused AdamW"
        ceiling = f"; FLOP ceiling {fmt_ratio(r['padded_to_packed_flops'])}" if name != "group_by_length" else ""
        rows.append(("Training", f"`{' '.join(r['flags'])}` supervised tok/s vs {against}, {data} (loss "
                     f"{r['mean_loss_timed']:.4f} vs {base['mean_loss_timed']:.4f}; padding waste "
                     f"{r['padding_waste']:.0%} vs {base['padding_waste']:.0%}{ceiling})", ">= 1.5x",
                     speed_text, (speed >= 1.5 and same_loss) if base_name.startswith("original") else None))
    if cpu and ok:
        for name in ("original", "packing", "packing_bf16"):
            r = ok.get(name)
            if not r:
                continue

            def peak(run, bf16=r["bf16"]):
                # bf16 runs against the better of the two peaks: a slow bf16 path is no ceiling to measure against
                c = run["cpu"]
                return max(c["matmul_bf16_flops"], c["matmul_fp32_flops"]) if bf16 else c["matmul_fp32_flops"]

            mfu, mfu_text = spread(runs, lambda run, n=name, p=peak: run["train"][n]["model_flops_s"] / p(run),
                                   fmt_percent)
            rows.append(("CPU", f"model FLOP/s share of the {'best' if r['bf16'] else 'fp32'} matmul peak, {name}",
                         ">= 40%", f"{mfu_text} ({median(runs, train_value(name, 'model_flops_s')) / 1e9:.1f} / "
                         f"{median(runs, peak) / 1e9:.1f} GFLOP/s)",
                         None if r["bf16"] else mfu >= 0.4))  # bf16 is not what trains here: no verdict
        if "packing" in ok and "packing_bf16" in ok:
            a, b = ok["packing"], ok["packing_bf16"]
            ratio, ratio_text = spread(runs, lambda run: run["train"]["packing_bf16"]["tokens_s"]
                                       / run["train"]["packing"]["tokens_s"], fmt_ratio)
            native = machine.native_bf16(cpu)
            rows.append(("CPU", "bf16 autocast vs fp32 (packing), tok/s; first timed step's loss; train.py's choice "
                         "from the CPU flags", "the faster one",
                         f"bf16 {ratio_text} of fp32 (loss {b['losses'][1]:.4f} vs {a['losses'][1]:.4f}); train.py: "
                         f"{'bf16' if native else 'fp32'} ({'native' if native else 'no native'} bf16)",
                         (ratio > 1) == native))
        if "padded" in ok and "padded_gradient_checkpointing" in ok:
            rss = [median(runs, train_value(n, "peak_rss_bytes")) / 2**30
                   for n in ("padded", "padded_gradient_checkpointing")]
            step_text = figure(runs, lambda run: run["train"]["padded_gradient_checkpointing"]["seconds"]
                               / run["train"]["padded"]["seconds"], fmt_ratio)
            rows.append(("CPU", "peak RSS, padded / with --gradient_checkpointing", "report",
                         f"{rss[0]:.2f} / {rss[1]:.2f} GiB (step time {step_text})", None))
    if chat:
        def chat_value(key, per_bound=False):
            return lambda run: run["chat"][key] / (run["chat"]["bound_tokens_s"] if per_bound else 1)

        share, share_text = spread(runs, chat_value("decode_tokens_s", True), fmt_percent)
        bound = median(runs, chat_value("bound_tokens_s"))
        rows.append(("Chat", f"decode tokens/s vs the bandwidth bound ({bound:.0f} tok/s), `chat.py` default; plain "
                     "`nn.Linear` "
                     f"{median(runs, chat_value('decode_plain_tokens_s')):.1f} tok/s; eager ceiling with the measured "
                     f"per-token floor: {median(runs, chat_value('reachable_tokens_s', True)):.0%}", ">= 60%",
                     f"{share_text} ({median(runs, chat_value('decode_tokens_s')):.1f} tok/s)", share >= 0.6))
        if chat.get("decode_compiled_tokens_s"):
            compiled, compiled_text = spread(runs, chat_value("decode_compiled_tokens_s", True), fmt_percent)
            rows.append(("Chat", f"decode tokens/s vs the bandwidth bound, `chat.py --compile` (compiling took "
                         f"{median(runs, chat_value('compile_s')):.0f} s)", ">= 60%",
                         f"{compiled_text} ({median(runs, chat_value('decode_compiled_tokens_s')):.1f} tok/s)",
                         compiled >= 0.6))
        reuse, reuse_text = spread(runs, chat_value("ttft_ratio_reuse"), fmt_ratio)
        rows.append(("Chat", f"time to first token, turn {chat['ttft_turn']} / turn 1 with KV-cache reuse "
                     f"({fmt_ratio(median(runs, chat_value('ttft_ratio_fresh')))} re-encoding)", "<= 1.5x",
                     reuse_text, reuse <= 1.5))
        if chat.get("ttft_ratio_knowledge"):
            grounded, grounded_text = spread(runs, chat_value("ttft_ratio_knowledge"), fmt_ratio)
            rows.append(("Chat", f"time to first token, turn {chat['ttft_turn']} / turn 1 with `--knowledge` and reuse",
                         "<= 1.5x", grounded_text, grounded <= 1.5))
            retrieval = median(runs, chat_value("retrieval_ms_median"))
            rows.append(("Chat", "retrieval per turn with `--knowledge format_dataset.csv` (median)", "<= 50 ms",
                         f"{retrieval:.0f} ms", retrieval <= 50))
    else:
        rows.append(("Chat", "decode vs bandwidth bound; TTFT turn 10 / turn 1", ">= 60%; <= 1.5x", "not run", None))
    if gpu and "rows" in gpu:
        for r in gpu["rows"]:
            def gpu_value(key, n=r["name"]):
                return lambda run: next(x for x in run["gpu"]["rows"] if x["name"] == n)[key]

            mfu, mfu_text = spread(runs, gpu_value("mfu"), fmt_percent)
            rows.append(("GPU", f"{r['name']} on {gpu['device']}", ">= 45% MFU",
                         f"{median(runs, gpu_value('tokens_s')):.0f} tok/s, MFU {mfu_text}", mfu >= 0.45))
    else:
        rows.append(("GPU", "seed command, ~1B LLaMA, FSDP + bf16 + tf32, seq 512", ">= 45% MFU",
                     "not measured in this run (see the GPU section)" if not gpu else gpu.get("reason", "not measured"),
                     None))
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def render(args, runs, load_start, load_end, started, minutes):
    """bench/run.py's section of docs/BENCHMARKS.md: every figure the median over `runs`, [min-max] beside it."""
    import transformers

    cpu, pre, tr, gpu, _ = (runs[0][k] for k in RUN_KEYS)
    description = cpu or machine.describe()

    def cpu_value(key, scale):
        return figure(runs, lambda run: run["cpu"][key] / scale, lambda x: f"{x:.1f}")

    repeats = f" --repeats {len(runs)}" if len(runs) > 1 else ""
    lines = ["# Benchmarks", "",
             f"Command: `python bench/run.py{' --quick' if args.quick else ''}{repeats}` (`make bench`), {started}, "
             f"{minutes:.1f} minutes.  ",
             f"Machine: {machine.summary(description)}; transformers {transformers.__version__}.  ",
             f"Load: 1-minute load average {load_start:.1f} at start, {load_end:.1f} at the end "
             f"(`uptime`; {description['cores']} cores). A load above the core count means other processes shared the "
             "CPU, so absolute figures are low and noisy; ratios are from the same run.  ",
             (f"Every timed figure is the median of {len(runs)} runs of every benchmark, with the lowest and highest "
              "in brackets; the Chat section at the end is the last run's.  " if len(runs) > 1 else
              "One run of every benchmark (`--repeats N` runs each N times and shows the spread).  "),
             "Raw results: [`docs/benchmarks.json`](benchmarks.json). Chart: ![benchmarks](benchmarks.png)", "",
             "## Goals", "", "| area | what | goal | measured | met |", "|---|---|---|---|---|"]
    for area, what, goal, measured, met in goal_rows(runs):
        mark = "" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {area} | {what} | {goal} | {measured} | {mark} |")
    if cpu:
        lines += ["", "## CPU limits (bench/bench_cpu.py, machine.py)", "", "| | value |", "|---|---|",
                  f"| matmul fp32 (n={cpu['matmul_fp32_n']}, torch.mm, best of repeats) | "
                  f"{cpu_value('matmul_fp32_flops', 1e9)} GFLOP/s |",
                  f"| matmul bf16 (n={cpu['matmul_bf16_n']}) | {cpu_value('matmul_bf16_flops', 1e9)} GFLOP/s |",
                  f"| memory bandwidth (large tensor copy, read + write) | "
                  f"{cpu_value('memory_bandwidth_bytes_s', 1e9)} GB/s |"]
    if pre:
        def pre_value(key, spec):
            return figure(runs, lambda r: r["preprocess"][key], lambda x: format(x, spec))

        lines += ["", "## Preprocessing (bench/bench_preprocess.py)", "",
                  f"{pre['records']} GenMedGPT records, SmolLM2 fast tokenizer, max length 512, "
                  f"TOKENIZERS_PARALLELISM={pre['tokenizers_parallelism']}; best of repeats.", "",
                  "| method | seconds | vs original |", "|---|---|---|",
                  f"| original (two tokenizer calls per example, one at a time) | {pre_value('original_s', '.2f')} | "
                  "1.00x |",
                  "| cold: `utils.tokenize_supervised` (one batched pass with offsets) | "
                  f"{pre_value('cold_s', '.2f')} | "
                  f"{figure(runs, lambda r: r['preprocess']['cold_speedup'], fmt_ratio)} |",
                  f"| warm: `utils.tokenize_cached` (hit) | {pre_value('warm_s', '.3f')} | "
                  f"{figure(runs, lambda r: r['preprocess']['warm_speedup'], fmt_ratio)} |"]
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

            def row_value(key, scale=1, spec=".1f", name=r["name"]):
                return figure(runs, lambda run: run["train"][name][key] / scale, lambda x: format(x, spec))

            lines.append(f"| {r['name']} | {what} | {r.get('data', 'genmedgpt')} | `{flags}` | "
                         f"{row_value('supervised_tokens_s')} | {row_value('tokens_s')} | "
                         f"{r['padding_waste']:.1%} | {r['mean_loss_timed']:.4f} | {row_value('model_flops_s', 1e9)} | "
                         f"{row_value('peak_rss_bytes', 2**30, '.2f')} GiB |")
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
              f"- bf16: {machine.bf16_sentence(description)}"]
    lines += ["", "GPU figures: the `## GPU` section below, written by `bench/bench_gpu.py --write` (this script runs it "
              "when CUDA is present)."]
    return "\n".join(lines) + "\n"


def write_doc(args, runs, load_start, load_end, started, minutes):
    """bench/run.py's section of docs/BENCHMARKS.md (created at the top of a new file); the '## Chat' section that
    bench/bench_chat.py writes, and anything else outside the markers, is left as it is."""
    args.batch_size = 4
    chart(runs[0]["train"], runs[0]["preprocess"], CHART)
    text = render(args, runs, load_start, load_end, started, minutes)
    replace_markdown_section(DOC, text, SECTION_BEGIN, SECTION_END, new_at_start=True)


def measure(args, skip, steps):
    """One run of every benchmark that is not skipped: {'cpu', 'preprocess', 'train', 'gpu', 'chat'}."""
    cpu = pre = gpu = chat = None
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
            replace_markdown_section(DOC, bench_gpu.render([gpu]), bench_gpu.SECTION_BEGIN, bench_gpu.SECTION_END,
                                     heading=bench_gpu.SECTION)
    if "chat" not in skip:
        print("chat ...", flush=True)
        chat_json = RESULTS.with_name("benchmarks-chat.json")
        chat_json.unlink(missing_ok=True)
        cmd = [sys.executable, str(ROOT / "bench" / "bench_chat.py"), "--write", str(DOC), "--json", str(chat_json),
               "--knowledge", str(ROOT / "format_dataset.csv")]
        if args.quick:
            cmd += ["--turns", "5", "--max_new_tokens", "16", "--decode_tokens", "32"]
        subprocess.run(cmd, cwd=ROOT, check=False)  # writes the '## Chat' section, which write_doc keeps
        chat = json.loads(chat_json.read_text()) if chat_json.exists() else None
        chat_json.unlink(missing_ok=True)
    if "lora" not in skip:
        print("lora ...", flush=True)
        cmd = [sys.executable, str(ROOT / "bench" / "bench_lora.py"), "--write", str(DOC)]
        cmd += ["--quick"] if args.quick else []
        subprocess.run(cmd, cwd=ROOT, check=False)  # writes the '## LoRA' section, which write_doc keeps
    return {"cpu": cpu, "preprocess": pre, "train": tr, "gpu": gpu, "chat": chat}


def saved_runs(saved):
    """The runs of a docs/benchmarks.json; one written before --repeats holds one run at its top level."""
    return saved.get("runs") or [{k: saved.get(k) for k in RUN_KEYS}]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every benchmark N times; each figure is then the median, with the min-max beside it")
    p.add_argument("--skip", default="", help="comma-separated: cpu,preprocess,train,chat,gpu,lora")
    p.add_argument("--train_steps", type=int)
    p.add_argument("--from_json", action="store_true", help="re-render docs/BENCHMARKS.md from docs/benchmarks.json")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    skip = set(filter(None, args.skip.split(",")))
    args.batch_size = 4
    args.train_records = 256 if args.quick else 512
    steps = args.train_steps or (1 if args.quick else 4)
    if args.from_json:
        saved = json.loads(RESULTS.read_text())
        meta = saved["meta"]
        args.quick, args.train_records = meta["quick"], meta["train_records"]
        write_doc(args, saved_runs(saved), meta["load_start"], meta["load_end"], meta["started"], meta["minutes"])
        return
    t0, started, load_start = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]
    print(f"bench: load average {load_start:.1f} at start")
    runs = []
    for i in range(args.repeats):
        if args.repeats > 1:
            print(f"run {i + 1} of {args.repeats}", flush=True)
        runs.append(measure(args, skip, steps))
    minutes, load_end = (time.perf_counter() - t0) / 60, os.getloadavg()[0]
    meta = {"quick": args.quick, "train_records": args.train_records, "load_start": load_start,
            "load_end": load_end, "started": started, "minutes": minutes, "repeats": args.repeats}
    write_json_atomic(RESULTS, {"runs": runs, "meta": meta})
    write_doc(args, runs, load_start, load_end, started, minutes)
    print(f"wrote {DOC} and {CHART} in {(time.perf_counter() - t0) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
