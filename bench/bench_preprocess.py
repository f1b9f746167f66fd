"""Preprocessing: the original Alpaca/ChatDoctor tokenization vs utils.tokenize_supervised (cold) and
utils.tokenize_cached (warm), on all 5,452 GenMedGPT records with the same fast tokenizer; and which ranks
tokenize under torchrun.

    python bench/bench_preprocess.py            # prints JSON
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

import utils  # noqa: E402
from original_preprocess import original_supervised_dataset  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
DATA = utils.GENMEDGPT_PATH


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ranks_that_tokenize(nproc=2, records=64):
    """torchrun --nproc_per_node nproc: train.tokenize (main_process_first) on each rank; count real passes."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "probe.py"
        script.write_text(
            "import json, os, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import train, utils\n"
            "calls = []\n"
            "inner = utils.tokenize_supervised\n"
            "utils.tokenize_supervised = lambda *a, **k: calls.append(1) or inner(*a, **k)\n"
            f"_, data_args, args = train.parse_args(['--output_dir', {tmp!r}, '--cache_dir', {tmp + '/cache'!r}])\n"
            "records = utils.load_records(utils.GENMEDGPT_PATH)"
            f"[:{records}]\n"
            f"tok = utils.load_tokenizer({str(MODEL)!r})\n"
            "examples = train.tokenize(records, data_args, args, tok)\n"
            f"open(os.path.join({tmp!r}, 'rank%s.json' % os.environ['RANK']), 'w').write("
            "json.dumps({'tokenized': len(calls), 'examples': len(examples)}))\n"
        )
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", str(script)]  # --standalone: a free port
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        per_rank = {}
        for r in range(nproc):
            f = Path(tmp) / f"rank{r}.json"
            if f.exists():
                per_rank[r] = json.loads(f.read_text())
        if len(per_rank) != nproc:
            raise RuntimeError(f"torchrun probe failed: {proc.stderr[-2000:]}")
        return {"nproc": nproc, "ranks_tokenizing": sum(1 for v in per_rank.values() if v["tokenized"]),
                "examples_per_rank": [v["examples"] for v in per_rank.values()]}


def run(repeats=3, records=None, torchrun=True, log=print):
    tokenizer = utils.load_tokenizer(MODEL)
    tokenizer.model_max_length = 512
    data = utils.load_records(DATA)[:records]
    result = {"records": len(data), "tokenizer": str(MODEL.name), "max_length": 512,
              "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"), "cores": os.cpu_count()}
    result["original_s"] = best_of(lambda: original_supervised_dataset(data, tokenizer), max(1, repeats - 1))
    log(f"  original: {result['original_s']:.2f} s")
    result["cold_s"] = best_of(lambda: utils.tokenize_supervised(data, tokenizer, 512), repeats)
    log(f"  cold (one batched pass): {result['cold_s']:.2f} s")
    with tempfile.TemporaryDirectory() as cache:
        first = utils.tokenize_cached(data, tokenizer, 512, cache)  # writes the cache
        result["warm_s"] = best_of(lambda: utils.tokenize_cached(data, tokenizer, 512, cache), repeats + 2)
        again = utils.tokenize_cached(data, tokenizer, 512, cache)
        assert again == first, "cache returned different examples"
    log(f"  warm (cached): {result['warm_s'] * 1000:.0f} ms")
    result["cold_speedup"] = result["original_s"] / result["cold_s"]
    result["warm_speedup"] = result["original_s"] / result["warm_s"]
    if torchrun:
        try:
            result.update(ranks_that_tokenize())
            log(f"  torchrun x{result['nproc']}: {result['ranks_tokenizing']} rank(s) tokenized")
        except Exception as e:  # noqa: BLE001 - reported as a failed row, not a crash of the whole bench
            result["torchrun_error"] = str(e)[-500:]
            log(f"  torchrun probe failed: {e}")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--records", type=int, help="first N records (default: all 5,452)")
    p.add_argument("--no_torchrun", action="store_true")
    args = p.parse_args()
    print(json.dumps(run(args.repeats, args.records, not args.no_torchrun), indent=2))


if __name__ == "__main__":
    main()
