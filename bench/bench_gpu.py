"""GPU throughput of the seed command: one GPU, torchrun + FSDP (full_shard auto_wrap), bf16, tf32, on a
~1.1B LLaMA-architecture model built from a config (random weights: speed only), sequence 512.

    python bench/bench_gpu.py                 # needs CUDA; prints JSON
    python bench/bench_gpu.py --steps 10 --batch_size 4 --json docs/gpu/h200-batch4.json --write docs/BENCHMARKS.md
    python bench/bench_gpu.py --from_json docs/gpu/*.json --write docs/BENCHMARKS.md   # re-render, no GPU needed
Configurations: padded (the original batching), --packing, each with SDPA and (when flash-attn is
installed) flash_attention_2, and with liger-kernel when installed. Each runs train.py's train() in its own
`torchrun --nproc_per_node 1` process via bench_train.py's worker. MFU = model FLOP/s / the GPU's dense bf16
peak (table below, by device name; --peak_tflops overrides). The device name is recorded with every figure.
"""
import argparse
import importlib.util
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

import bench_train  # noqa: E402
import machine  # noqa: E402
from utils import replace_markdown_section, write_json_atomic  # noqa: E402

SECTION = "## GPU"
SECTION_BEGIN = "<!-- bench/bench_gpu.py: begin (generated; edits inside are overwritten) -->"
SECTION_END = "<!-- bench/bench_gpu.py: end -->"

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, without sparsity).
BF16_PEAK_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "H100 NVL": 835,
                    "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70, "RTX 4090": 165}
# TinyLlama-1.1B's shape: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
SEED_FLAGS = ["--bf16", "True", "--tf32", "True", "--fsdp", "full_shard auto_wrap",
              "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--weight_decay", "0.",
              "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03"]


def peak_flops(name, override=None):
    if override:
        return override * 1e12
    for key, tflops in BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops * 1e12
    raise SystemExit(f"unknown GPU {name!r}: pass --peak_tflops")


DEFAULT_TOKENIZER = ROOT / "models" / "SmolLM2-135M-Instruct"  # `make model`; any tokenizer folder will do


def build_model(out_dir, tokenizer_dir=DEFAULT_TOKENIZER):
    """Random-weight LLaMA ~1.1B with the embedded default's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **LLAMA_1B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def configurations():
    """name -> (extra train.py flags, attention implementation)."""
    attns = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    configs = {}
    for attn in attns:
        for name, flags in (("padded", []), ("packing", ["--packing", "True"])):
            configs[f"{name}_{attn}"] = (flags, attn)
    if importlib.util.find_spec("liger_kernel"):
        configs["packing_sdpa_liger"] = (["--packing", "True", "--use_liger_kernel", "True"], "sdpa")
    return configs


def run(steps=10, batch_size=4, records=2048, quick=False, only=None, peak_tflops=None, log=print,
        tokenizer_dir=DEFAULT_TOKENIZER):
    import torch

    if not torch.cuda.is_available():
        return {"reason": "not measured: no CUDA device"}
    device = torch.cuda.get_device_name(0)
    peak = peak_flops(device, peak_tflops)
    steps = 3 if quick else steps
    results = {"device": device, "peak_flops": peak, "rows": [], "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-1b"
        results["n_params"] = build_model(model_dir, tokenizer_dir)
        torch.cuda.empty_cache()
        for name, flags in configurations().items():
            if only and name not in only:
                continue
            bench_train.CONFIGS[name] = SEED_FLAGS + flags[0]
            out = Path(tmp) / f"{name}.json"
            torchrun = Path(sys.executable).with_name("torchrun")
            cmd = [str(torchrun), "--standalone", "--nproc_per_node=1", str(ROOT / "bench" / "bench_gpu.py"),
                   "--worker", name, "--out", str(out), "--steps", str(steps), "--batch_size", str(batch_size),
                   "--records", str(records), "--model", str(model_dir)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                log(f"gpu bench {name} failed:\n{proc.stderr[-3000:]}")
                results["rows"].append({"name": name, "device": device, "error": proc.stderr[-500:], "tokens_s": 0,
                                        "mfu": 0.0})
                continue
            r = json.loads(out.read_text())
            r.update(name=name, device=device, mfu=r["model_flops_s"] / peak)
            results["rows"].append(r)
            log(f"  {name} on {device}: {r['tokens_s']:.0f} tok/s, {r['supervised_tokens_s']:.0f} supervised tok/s, "
                f"MFU {r['mfu']:.1%}, waste {r['padding_waste']:.1%} ({time.perf_counter() - start:.0f} s)")
    return results


def render(results_list):
    """The GPU section of docs/BENCHMARKS.md: one row per configuration of each saved run."""
    lines = ["Random-weight LLaMA of TinyLlama-1.1B's shape on GenMedGPT training records (sequences up to 512), "
             "the seed command's flags (FSDP full_shard auto_wrap under `torchrun --nproc_per_node 1`, bf16, tf32, "
             "cosine, warmup 0.03), 1 warm-up step then the timed steps. MFU = model FLOP/s over the GPU's dense bf16 "
             "peak. Each row names the command that measured it.", "",
             "| command | device | batching | per-device batch | tokens/s | supervised tokens/s | MFU | padding | "
             "mean loss |", "|---|---|---|---|---|---|---|---|---|"]
    for results in results_list:
        for r in results.get("rows", []):
            lines.append(f"| `{results.get('command', 'python bench/bench_gpu.py')}` | {r['device']} | {r['name']} | "
                         f"{results.get('batch_size', '?')} | {r['tokens_s']:.0f} | {r['supervised_tokens_s']:.0f} | "
                         f"{r['mfu']:.1%} | {r['padding_waste']:.0%} | {r['mean_loss_timed']:.3f} |")
    for results in results_list:
        if results.get("machine"):
            lines += ["", f"Machine: {machine.summary(results['machine'])}; transformers "
                          f"{results.get('transformers', '?')}."]
            break
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=4, help="per device (the paper: 4, sequence 512)")
    p.add_argument("--records", type=int, default=2048)
    p.add_argument("--configs", help="comma-separated subset of " + ",".join(configurations()))
    p.add_argument("--peak_tflops", type=float, help="bf16 dense peak of this GPU, if not in the table")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer folder for the random-weight model")
    p.add_argument("--json", help="save the results (with the command and the machine) to this file")
    p.add_argument("--write", help="rewrite the GPU section of this markdown file (docs/BENCHMARKS.md)")
    p.add_argument("--from_json", nargs="+", help="render --write from saved --json files instead of measuring")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # inside torchrun: one configuration through train.train()
        flags, attn = configurations()[args.worker]
        bench_train.CONFIGS[args.worker] = SEED_FLAGS + flags
        args.max_length, args.threads, args.data_path = 512, None, bench_train.DATA
        # train.py loads with transformers' default (sdpa); the benchmark swaps the kernel
        return bench_train.worker(args.worker, args, args.out, None if attn == "sdpa" else attn)
    if args.from_json:
        results_list = [json.loads(Path(path).read_text()) for path in args.from_json]
    else:
        only = args.configs.split(",") if args.configs else None
        results = run(args.steps, args.batch_size, args.records, only=only, peak_tflops=args.peak_tflops,
                      tokenizer_dir=args.tokenizer, log=lambda text: print(text, file=sys.stderr))
        import transformers

        results.update(command="python bench/bench_gpu.py " + " ".join(sys.argv[1:]), batch_size=args.batch_size,
                       machine=machine.describe(), transformers=transformers.__version__)
        print(json.dumps(results, indent=2))
        if args.json:
            write_json_atomic(args.json, results)
        results_list = [results]
    if args.write:
        replace_markdown_section(args.write, render(results_list), SECTION_BEGIN, SECTION_END, heading=SECTION)


if __name__ == "__main__":
    main()
