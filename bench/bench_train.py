"""Training throughput of train.py itself: padded (the original batching) vs --group_by_length vs --packing,
fp32 vs bf16 autocast, and what --gradient_checkpointing saves in peak memory.

    python bench/bench_train.py                 # all configurations, prints JSON
    python bench/bench_train.py --steps 2       # shorter
Each configuration runs `train.train()` with the real flags in its own process (so peak RSS is its own),
on the same records in the same order (same seed), for 1 warm-up step plus --steps timed steps, with the
loss logged every step. Supervised tokens are those with a label (the response); padding waste is the
share of computed positions that are padding. Model FLOPs are what the batch needs (`flops_per_batch`).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

MODEL = str(ROOT / "models" / "SmolLM2-135M-Instruct")
DATASETS = {"genmedgpt": str(ROOT / "data" / "genmedgpt_train.json"),  # stage 2 of the recipe
            "alpaca": str(ROOT / "alpaca_data.json")}  # stage 1
DATA = DATASETS["genmedgpt"]

# bf16 autocast on a CPU without native bf16 runs many times slower: one timed step is enough to see it.
FEWER_STEPS = {"packing_bf16": 1}
ORIGINAL = ["--optim", "adamw_torch"]  # the original's optimizer: AdamW one tensor group at a time, unfused
# name -> extra train.py flags. "original" is the original recipe's batching (pad to the longest in the batch)
# and optimizer; "padded" the same batching with this project's default fused AdamW.
CONFIGS = {
    "original": ORIGINAL,
    "padded": [],
    "group_by_length": ["--group_by_length", "True"],
    "packing_block_mask": ["--packing", "True"],  # one SDPA over the whole row with transformers' block mask
    "packing_all_logits": ["--packing", "True"],  # + one attention per example; the LM head at every position
    "packing": ["--packing", "True"],  # what train.py does: + logits only where a label is
    "packing_bf16": ["--packing", "True", "--bf16", "True"],
    "padded_gradient_checkpointing": ["--gradient_checkpointing", "True"],
    "original_alpaca": ORIGINAL,
    "packing_alpaca": ["--packing", "True"],
}


DESCRIPTIONS = {
    "original": "the original: padded, unfused AdamW",
    "padded": "padded, fused AdamW (this project's default optimizer)",
    "group_by_length": "length-grouped padded batches",
    "packing_block_mask": "packed row, one SDPA over it with transformers' block mask, logits everywhere",
    "packing_all_logits": "packed, one SDPA per example, logits everywhere",
    "packing": "packed, one SDPA per example, logits only where a label is (train.py --packing)",
    "packing_bf16": "packing with bf16 autocast",
    "padded_gradient_checkpointing": "padded with gradient checkpointing",
    "original_alpaca": "the original, on Alpaca",
    "packing_alpaca": "train.py --packing, on Alpaca",
}


def dataset_of(name):
    return "alpaca" if name.endswith("_alpaca") else "genmedgpt"


def flops_per_batch(config, batch):
    """The FLOPs a batch needs, however it is computed: every real token through the body, the LM head where a
    label is (elsewhere its logits are thrown away), causal attention within each example; forward + backward."""
    body = config["n_params"] - config["head"]
    attention = 6 * config["layers"] * config["hidden"]
    return (6 * body * batch["real"] + 6 * config["head"] * batch["supervised"]
            + sum(attention * n * n for n in batch["lengths"]))


def padded_to_packed_flops(config, batches):
    """The most packing can save on these batches: FLOPs of padded batches (every position through the body
    and the LM head, attention at the padded width) over the FLOPs they need (`flops_per_batch`, which is what
    packing computes). At equal FLOP/s that is packing's speed-up."""
    attention = 6 * config["layers"] * config["hidden"]
    padded = sum(6 * config["n_params"] * max(b["lengths"]) * len(b["lengths"])
                 + attention * max(b["lengths"]) ** 2 * len(b["lengths"]) for b in batches)
    return padded / sum(flops_per_batch(config, b) for b in batches)


def current_rss_bytes():
    """This process's resident memory now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(name, args, out_path, attn_implementation=None):
    """One configuration in this process: train.train() with a timing callback and a counting collator."""
    import torch
    from transformers import TrainerCallback

    import train
    import utils

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = []  # per collated batch: real tokens, computed positions, supervised tokens, lengths

    def counting(collate):
        def wrapped(examples):
            batch = collate(examples)
            lengths = [len(e["input_ids"]) for e in examples]
            batches.append({"real": sum(lengths), "computed": batch["input_ids"].numel(), "lengths": lengths,
                            "supervised": sum(sum(t != utils.IGNORE_INDEX for t in e["labels"]) for e in examples)})
            return batch
        return wrapped

    if name in ("packing_block_mask", "packing_all_logits"):
        collator = lambda default: counting(partial(utils.collate_packed, logits_only_where_supervised=False))  # noqa: E731
    else:
        collator = counting

    step_times = []

    rss_at_start = []

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, model=None, **kw):
            with torch.no_grad():  # weights are read lazily from the file: make every page resident first
                for p in model.parameters():
                    p.detach().reshape(-1)[::512].sum()
            rss_at_start.append(current_rss_bytes())  # the model is loaded; no optimizer state, no activations yet

        def on_step_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # a GPU step has only been queued when the callback runs
            step_times.append(time.perf_counter() - self.start)

    # packing_block_mask keeps the model's own SDPA, which masks the whole row; the final save is not a step.
    variations = train.Variations(attn_implementation=attn_implementation,
                                  packed_attention=name != "packing_block_mask", collator=collator,
                                  callbacks=(Timer(),), save_final_model=False)

    records = utils.load_data(args.data_path or DATASETS[dataset_of(name)])[: args.records]
    data_file = Path(out_path).with_suffix(".data.json")
    data_file.write_text(json.dumps(records))
    out_dir = tempfile.mkdtemp(prefix=f"bench-{name}-")
    argv = ["--model_name_or_path", args.model, "--data_path", str(data_file), "--output_dir", out_dir,
            "--overwrite_output_dir", "True", "--max_steps", str(args.steps + 1), "--per_device_train_batch_size",
            str(args.batch_size), "--gradient_accumulation_steps", "1", "--learning_rate", "2e-5",
            "--model_max_length", str(args.max_length), "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "42", "--cache_dir", str(Path(out_dir) / "tok"),
            "--dataloader_num_workers", "0"] + CONFIGS[name] + (["--cpu_bf16", "force"] if "bf16" in name else [])
    trainer = train.train(argv, variations)  # bf16 rows are measured even where train.py would train in fp32
    model = trainer.model
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings count once, as the LM head
    if not getattr(cfg, "tie_word_embeddings", False):
        n_params -= model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    config = {"n_params": n_params, "head": cfg.vocab_size * cfg.hidden_size, "layers": cfg.num_hidden_layers,
              "hidden": cfg.hidden_size}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = batches[1 : 1 + args.steps]  # step 0 is the warm-up
    seconds = sum(step_times[1 : 1 + args.steps])
    result = {
        "name": name, "flags": CONFIGS[name], "data": dataset_of(name), "steps": len(timed), "seconds": seconds,
        "losses": losses, "mean_loss_timed": sum(losses[1:]) / max(1, len(losses[1:])),
        "supervised_tokens": sum(b["supervised"] for b in timed), "real_tokens": sum(b["real"] for b in timed),
        "computed_positions": sum(b["computed"] for b in timed),
        "model_flops": sum(flops_per_batch(config, b) for b in timed),
        "padded_to_packed_flops": padded_to_packed_flops(config, timed),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_at_train_begin_bytes": rss_at_start[0],
        "bf16": bool(trainer.args.bf16), "threads": torch.get_num_threads(), **config,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    result["supervised_tokens_s"] = result["supervised_tokens"] / seconds
    result["tokens_s"] = result["real_tokens"] / seconds
    result["model_flops_s"] = result["model_flops"] / seconds
    result["padding_waste"] = 1 - result["real_tokens"] / result["computed_positions"]
    Path(out_path).write_text(json.dumps(result))


def run(steps=4, batch_size=4, records=512, max_length=512, configs=None, threads=None, log=print):
    """Every configuration in a fresh process; returns {name: result}."""
    results = {}
    for name in configs or CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(out),
                   "--steps", str(min(steps, FEWER_STEPS.get(name, steps))),
                   "--batch_size", str(batch_size), "--records", str(records), "--max_length", str(max_length)]
            if threads:
                cmd += ["--threads", str(threads)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                log(f"train bench {name} failed:\n{proc.stderr[-3000:]}")
                results[name] = {"name": name, "error": proc.stderr.strip().splitlines()[-1:]}
                continue
            results[name] = json.loads(out.read_text())
            r = results[name]
            log(f"  {name}: {r['supervised_tokens_s']:.1f} supervised tok/s, {r['tokens_s']:.1f} tok/s, "
                f"waste {r['padding_waste']:.1%}, loss {r['mean_loss_timed']:.4f}, RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
                f"({time.perf_counter() - start:.0f} s)")
    return results


def add_run_arguments(p, configs, data_help):
    """The flags of a training benchmark run and of its worker processes (also bench/bench_lora.py's)."""
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    p.add_argument("--batch_size", type=int, default=4, help="per-device batch (the paper: 4)")
    p.add_argument("--records", type=int, default=512, help="first N training records")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--configs", help="comma-separated subset of " + ",".join(configs))
    p.add_argument("--threads", type=int)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--data_path", help=data_help)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, CONFIGS, "instead of each configuration's own (GenMedGPT, or Alpaca for *_alpaca)")
    args = p.parse_args()
    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        return worker(args.worker, args, args.out)
    configs = args.configs.split(",") if args.configs else None
    results = run(args.steps, args.batch_size, args.records, args.max_length, configs, args.threads)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
