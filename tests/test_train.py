"""train.py: legacy flags, CPU adaptation, a real tiny training run, the seed command under torchrun."""
import json

import pytest
import torch

import machine
import train
import utils
from conftest import run_train, short_records

# The seed README's command, verbatim apart from the model, data and output paths.
SEED_COMMAND = (
    "--bf16 True --num_train_epochs 3 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 "
    "--gradient_accumulation_steps 8 --evaluation_strategy no --save_strategy steps --save_steps 2000 "
    "--save_total_limit 1 --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine "
    "--logging_steps 1 --fsdp full_shard_auto_wrap --fsdp_transformer_layer_cls_to_wrap LLaMADecoderLayer "
    "--tf32 True"
).split()
SEED_COMMAND[SEED_COMMAND.index("full_shard_auto_wrap")] = "full_shard auto_wrap"


@pytest.fixture()
def small_data(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(short_records(64)))
    return path


def test_seed_flags_are_mapped_and_adapted_to_cpu(caplog, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with caplog.at_level("INFO", logger="chatdoctor"):
        _, _, args = train.parse_args(["--output_dir", "unused", *SEED_COMMAND])
    assert args.eval_strategy == "no"
    assert args.warmup_steps == 0.03
    assert args.learning_rate == 2e-5 and args.lr_scheduler_type == "cosine" and args.weight_decay == 0.0
    assert args.model_max_length == 512 and args.optim == "adamw_torch_fused"
    assert args.use_cpu and not args.tf32 and not args.fsdp
    assert args.bf16 == machine.cpu_has_native_bf16()
    bf16_line = "bf16 as CPU autocast" if args.bf16 else "--bf16 dropped, fp32 instead"
    for line in ("--evaluation_strategy no -> --eval_strategy", "--warmup_ratio 0.03", "--tf32 dropped",
                 "use_cpu=True", "--fsdp dropped", bf16_line):
        assert line in caplog.text


def test_group_by_length_legacy_flag():
    _, _, args = train.parse_args(["--output_dir", "unused", "--group_by_length", "True"])
    assert args.train_sampling_strategy == "group_by_length"


def test_unknown_flag_is_rejected():
    with pytest.raises(ValueError, match="--no_such_flag"):
        train.parse_args(["--output_dir", "unused", "--no_such_flag", "1"])


def test_fsdp_wrap_class_resolves_to_the_models_own(tiny_model_dir):
    model = utils.load_model(tiny_model_dir)
    assert train.resolve_wrap_class("LLaMADecoderLayer", model) == ["LlamaDecoderLayer"]
    assert train.resolve_wrap_class(None, model) == ["LlamaDecoderLayer"]
    assert train.resolve_wrap_class("LlamaDecoderLayer", model) == ["LlamaDecoderLayer"]
    assert train.resolve_wrap_class("GPTBlock", model) == ["LlamaDecoderLayer"]


def test_tiny_training_lowers_loss_and_saved_folder_reloads_with_equal_logits(tiny_model_dir, small_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    trainer = train.train([
        "--model_name_or_path", str(tiny_model_dir), "--data_path", str(small_data), "--output_dir", str(out),
        "--max_steps", "12", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--report_to", "none",
        "--save_strategy", "no", "--cache_dir", str(tmp_path / "cache"), "--seed", "1",
    ])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.4

    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "loss.png").stat().st_size > 1000
    assert utils.recorded_prompt_style(out) == "alpaca"  # chat.py and eval.py prompt it as it was trained
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # no project code needed
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded.generation_config.eos_token_id == tokenizer.eos_token_id
    x = tokenizer(["Doctor, I have a headache."], return_tensors="pt")
    trained = trainer.model.to("cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**x).logits, trained(**x).logits, rtol=0, atol=1e-6)


def test_packing_trains_on_the_same_losses_as_padding(tiny_model_dir, small_data, tmp_path):
    """Same seed, same batches: --packing logs the padded run's losses step for step, trains with one
    attention per example, and saves a folder that loads without project code."""
    from transformers import AutoModelForCausalLM

    runs = {}
    for packing in ("False", "True"):
        out = tmp_path / f"packing-{packing}"
        trainer = train.train([
            "--model_name_or_path", str(tiny_model_dir), "--data_path", str(small_data), "--output_dir", str(out),
            "--max_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--packing", packing,
            "--cache_dir", str(tmp_path / "cache"), "--seed", "1",
        ])
        runs[packing] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        expected = utils.PACKED_ATTENTION if packing == "True" else "sdpa"
        assert trainer.model.config._attn_implementation == expected
    assert len(runs["True"]) == 4
    assert runs["True"] == pytest.approx(runs["False"], rel=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packing-True")
    assert reloaded.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_seed_command_verbatim_under_torchrun_with_two_cpu_ranks(tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "pretrained"
    result = run_train(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(small_data),
                        "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), *SEED_COMMAND],
                       torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "strategy: DDP over 2 CPU processes (gloo)" in log
    assert "--fsdp dropped" in log and "--tf32 dropped" in log
    state = json.loads((out / "trainer_state.json").read_text())
    # 64 records / (2 ranks x 4 x 8) = 1 step per epoch; unlinked ranks would each take 2.
    assert state["global_step"] == 3
    assert (out / "model.safetensors").is_file()
    assert log.count("tokenized 64 records") == 1  # only rank 0 tokenizes; rank 1 reads its cache


@pytest.mark.parametrize("problem", ["bad_data", "missing_model"])
def test_bad_input_is_one_line_nonzero_exit_and_nothing_written(tiny_model_dir, tmp_path, problem):
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": null}]')
    model = str(tmp_path / "no-such-model") if problem == "missing_model" else str(tiny_model_dir)
    out = tmp_path / "out"
    result = run_train(["--model_name_or_path", model, "--data_path", str(data), "--output_dir", str(out)])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = "no-such-model: model folder not found" if problem == "missing_model" else \
        "data.json: record 1: field 'output' must be a string, got null"
    assert len(errors) == 1 and expected in errors[0]
    assert not out.exists()


def test_stage1_on_the_bundled_sample_warns_once(tmp_path, caplog):
    user_file = tmp_path / "alpaca_data_52k.json"
    user_file.write_text(json.dumps(short_records(3)))
    with caplog.at_level("WARNING", logger="chatdoctor"):
        train.warn_if_alpaca_sample(f"{utils.ALPACA_SAMPLE_PATH},{user_file}")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "999-record Alpaca sample" in warnings[0] and "52k" in warnings[0]
    caplog.clear()
    train.warn_if_alpaca_sample(str(user_file))
    assert not caplog.records
