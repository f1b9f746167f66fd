"""What the speed work changed must not change results: the warm (cached) path, the tokenizer fingerprint,
and the benchmark report generator (checked on made-up figures; nothing here is timed)."""
import sys
from argparse import Namespace
from pathlib import Path

import torch

import utils
from utils import load_records, tokenize_supervised

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_warm_cache_reads_like_the_cold_list(tokenizer, tmp_path):
    records = load_records(utils.GENMEDGPT_PATH)[:30]
    cold = utils.tokenize_cached(records, tokenizer, 256, tmp_path)
    warm = utils.tokenize_cached(records, tokenizer, 256, tmp_path)
    assert isinstance(warm, utils.TokenizedExamples) and isinstance(cold, list)
    assert warm == cold == tokenize_supervised(records, tokenizer, 256)
    assert len(warm) == 30 and warm[-1] == cold[-1] and warm[3:7] == cold[3:7] and list(warm) == cold
    assert all(type(t) is int for t in warm[0]["input_ids"] + warm[0]["labels"])  # plain lists, as before
    for i in (30, -31):
        try:
            warm[i]
        except IndexError:
            pass
        else:
            raise AssertionError(f"index {i} should be out of range")
    for collate in (lambda b: utils.collate_padded(b, tokenizer.pad_token_id), utils.collate_packed):
        a, b = collate(list(warm[:4])), collate(cold[:4])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    loader = torch.utils.data.DataLoader(warm, batch_size=4, collate_fn=utils.collate_packed)
    assert sum(int(batch["shift_labels"].numel()) for batch in loader) == sum(
        sum(t != utils.IGNORE_INDEX for t in e["labels"]) for e in cold)


def test_fingerprint_ignores_and_keeps_per_call_settings(tokenizer):
    before = utils.tokenizer_fingerprint(tokenizer)
    tokenizer(["a b c", "d"], max_length=5, truncation=True, padding="max_length")
    backend = tokenizer.backend_tokenizer
    settings = (backend.truncation, backend.padding)
    assert utils.tokenizer_fingerprint(tokenizer) == before
    assert (backend.truncation, backend.padding) == settings  # restored after hashing


def fake_results():
    cpu = {"cpu": "Test CPU", "cpu_flags": ["avx2"], "matmul_fp32_n": 8, "matmul_bf16_n": 8, "matmul_fp32_flops": 100e9,
           "matmul_bf16_flops": 10e9, "memory_bandwidth_bytes_s": 20e9}
    pre = {"records": 5452, "original_s": 10.0, "cold_s": 2.0, "warm_s": 0.1, "cold_speedup": 5.0,
           "warm_speedup": 100.0, "tokenizers_parallelism": "true", "nproc": 2, "ranks_tokenizing": 1,
           "examples_per_rank": [5, 5]}

    def row(name, flags, sup, loss, bf16=False, data="genmedgpt"):
        return {"name": name, "flags": flags, "data": data, "steps": 2, "seconds": 10.0, "supervised_tokens_s": sup,
                "tokens_s": 3 * sup, "padding_waste": 0.2, "mean_loss_timed": loss, "model_flops_s": 50e9,
                "peak_rss_bytes": 2**31, "bf16": bf16, "n_params": 135e6, "losses": [loss, loss],
                "padded_to_packed_flops": 1.3}

    tr = {"original": row("original", ["--optim", "adamw_torch"], 9.0, 2.0),
          "padded": row("padded", [], 10.0, 2.0), "packing": row("packing", ["--packing", "True"], 16.0, 2.0),
          "original_alpaca": row("original_alpaca", ["--optim", "adamw_torch"], 5.0, 1.5, data="alpaca"),
          "packing_alpaca": row("packing_alpaca", ["--packing", "True"], 6.0, 1.8, data="alpaca"),
          "packing_bf16": row("packing_bf16", ["--packing", "True", "--bf16", "True"], 4.0, 2.01, bf16=True),
          "padded_gradient_checkpointing": row("padded_gradient_checkpointing", ["--gradient_checkpointing", "True"],
                                               8.0, 2.0),
          "group_by_length": {"name": "group_by_length", "error": ["boom"]}}
    return cpu, pre, tr


def test_report_has_goal_rows_and_keeps_gpu_honest(tmp_path):
    import run

    cpu, pre, tr = fake_results()
    chat = {"bound_tokens_s": 50.0, "decode_tokens_s": 20.0, "decode_plain_tokens_s": 15.0, "floor_s": 0.01,
            "reachable_tokens_s": 33.3, "ttft_turn": 10, "ttft_ratio_reuse": 1.2, "ttft_ratio_fresh": 5.0}
    rows = run.goal_rows(cpu, pre, tr, None, chat)
    by_what = {what: (goal, measured, met) for _, what, goal, measured, met in rows}

    def row_for(start, *words):
        return next(v for k, v in by_what.items() if k.startswith(start) and all(w in k for w in words))

    assert row_for("`--packing True` supervised", "the original", "GenMedGPT") == (">= 1.5x", "1.78x", True)
    assert row_for("`--packing True` supervised", "same fused AdamW") == (">= 1.5x", "1.60x", None)  # no verdict
    # 1.2x short of the goal, and a loss that differs from the original's is never a pass
    assert row_for("`--packing True` supervised", "Alpaca")[1:] == ("1.20x", False)
    assert row_for("decode tokens/s") == (">= 60%", "40% (20.0 tok/s)", False)
    assert row_for("time to first token") == ("<= 1.5x", "1.20x", True)
    assert any(m == "not measured: no GPU lent this session" for _, m, _ in by_what.values())
    args = Namespace(quick=False, train_records=512, batch_size=4)
    text = run.render(args, cpu, pre, tr, None, chat, 1.0, 1.0, "now", 1.0)
    assert "| Preprocessing | warm (cached) vs original | >= 50x | 100.00x (100 ms) | yes |" in text
    assert "failed: ['boom']" in text and "## GPU" in text
    run.chart(tr, pre, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_model_flops_count_what_a_batch_needs_and_the_packing_ceiling():
    import bench_train

    config = {"n_params": 10, "head": 4, "layers": 1, "hidden": 1}
    batch = {"lengths": [2, 4], "real": 6, "supervised": 3}
    # body 6 params x 6 tokens, head 4 params x 3 supervised tokens, attention 2^2 + 4^2; x 6 (forward + backward)
    assert bench_train.flops_per_batch(config, batch) == 6 * 6 * 6 + 6 * 4 * 3 + 6 * (4 + 16)
    # padded: both rows 4 wide, all 10 parameters at every position
    assert bench_train.padded_to_packed_flops(config, [batch]) == (6 * 10 * 8 + 6 * 16 * 2) / 408
