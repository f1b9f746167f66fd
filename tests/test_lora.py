"""LoRA and QLoRA (train.py --lora_r, --load_in_4bit): what trains, what is saved and how it loads (plain
transformers, peft, utils' loader), resuming after a kill, two CPU ranks, and the refusals."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chat
import checkpoints
import train
import utils
from conftest import KILL_DURING_SAVE, error_lines, make_tiny_llama, run_train, short_records, tiny_args

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ["Doctor, I have a headache and a stiff neck."]
# The tiny LLaMA's projections (hidden 32, 4 heads of 8, 2 KV heads, MLP 64): in + out features of each.
TINY_PROJECTION_SIZES = {"q_proj": 32 + 32, "k_proj": 32 + 16, "v_proj": 32 + 16, "o_proj": 32 + 32,
                         "gate_proj": 32 + 64, "up_proj": 32 + 64, "down_proj": 64 + 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora-data") / "data.json"
    path.write_text(json.dumps(short_records(16)))
    return path


@pytest.fixture(scope="module")
def no_pad_model_dir(tmp_path_factory, tokenizer):
    """A tiny LLaMA whose tokenizer has no pad token, as LLaMA's own: train.py adds one and grows the vocabulary,
    so the adapter must carry the resized embeddings."""
    from transformers import AutoTokenizer

    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny-no-pad"), tokenizer, seed=1)
    no_pad = AutoTokenizer.from_pretrained(folder)
    no_pad.pad_token = None
    no_pad.save_pretrained(folder)
    return folder


def lora_args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-2", "--logging_steps", "1",
            "--report_to", "none", "--seed", "1", "--cache_dir", str(Path(out).parent / "cache"),
            "--lora_r", "8", *extra]


def logits(model, tokenizer):
    with torch.no_grad():
        return model.eval()(**tokenizer(PROMPT, return_tensors="pt")).logits


def mean_loss(model, tokenizer, records):
    """The model's loss on `records` as training computes it (response tokens only)."""
    batch = utils.collate_padded(utils.tokenize_supervised(records, tokenizer, 512), tokenizer.pad_token_id)
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def max_difference(a, b):
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# ----------------------------------------------------------------------------- what trains

def test_only_the_adapters_train_on_every_projection_by_default(tiny_model_dir):
    model = utils.load_model(tiny_model_dir)
    assert train.resolve_lora_targets(None, model) == list(train.LORA_TARGETS)
    _, _, args = train.parse_args(["--output_dir", "unused", "--lora_r", "4"])
    lora = train.apply_lora(model, args, tiny_model_dir)
    trainable = {name: p.numel() for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    layers = model.config.num_hidden_layers
    assert sum(trainable.values()) == layers * sum(4 * size for size in TINY_PROJECTION_SIZES.values())

    model = utils.load_model(tiny_model_dir)
    _, _, args = train.parse_args(["--output_dir", "unused", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj"])
    lora = train.apply_lora(model, args, tiny_model_dir)
    assert lora.get_nb_trainable_parameters()[0] == layers * 4 * (TINY_PROJECTION_SIZES["q_proj"]
                                                                    + TINY_PROJECTION_SIZES["v_proj"])


def test_a_target_module_the_model_lacks_is_one_line_error(tiny_model_dir, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(lora_args(tiny_model_dir, data, tmp_path / "out", "--lora_target_modules", "q_proj,query_key_value"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "--lora_target_modules query_key_value: not a module of LlamaForCausalLM" in line and "q_proj" in line
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals of a machine without CUDA")
@pytest.mark.parametrize("flags, expected", [
    (["--lora_r", "8", "--load_in_4bit", "True"], "--load_in_4bit needs a CUDA GPU (bitsandbytes)"),
    (["--lora_r", "8", "--load_in_8bit", "True"], "--load_in_8bit needs a CUDA GPU (bitsandbytes)"),
    (["--load_in_4bit", "True"], "--load_in_4bit trains LoRA adapters on a frozen quantized model (QLoRA)"),
    (["--lora_r", "8", "--load_in_4bit", "True", "--load_in_8bit", "True"], "choose one"),
    (["--lora_r", "-1"], "--lora_r must be >= 0 (0: full fine-tuning), got -1"),
    (["--lora_r", "8", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
    (["--lora_r", "8", "--lora_alpha", "0"], "--lora_alpha must be > 0, got 0"),
])
def test_bad_lora_flags_are_one_line_before_any_data_is_read(flags, expected, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(tmp_path / "never-read.json"),
                    "--output_dir", str(out), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert expected in line and "Traceback" not in err
    assert not out.exists()


def test_a_lora_run_is_another_run_than_full_fine_tuning(tmp_path):
    def fingerprint(*flags):
        _, _, args = train.parse_args(["--output_dir", "unused", *flags])
        return checkpoints.run_fingerprint("no-such/model", short_records(2), args)

    full, lora = fingerprint(), fingerprint("--lora_r", "8")
    assert not set(checkpoints.LORA_ARGS) & set(full["hyperparameters"])  # full runs: fingerprints as before LoRA
    assert lora["hyperparameters"]["lora_r"] == 8 and lora["digest"] != full["digest"]
    assert fingerprint("--lora_r", "8", "--lora_alpha", "32")["digest"] != lora["digest"]
    full_out = tmp_path / "full"
    full_out.mkdir()
    (full_out / "config.json").write_text("{}")
    checkpoints.write_fingerprint(full_out, full)
    with pytest.raises(checkpoints.OutputDirError, match="lora_r None -> 8"):
        checkpoints.check_output_dir(full_out, lora, overwrite=False)
    adapter_out = tmp_path / "adapter"  # a finished adapter (--merge_lora False) is a finished model too
    adapter_out.mkdir()
    (adapter_out / utils.ADAPTER_CONFIG).write_text("{}")
    checkpoints.write_fingerprint(adapter_out, lora)
    with pytest.raises(checkpoints.OutputDirError, match="holds a finished model"):
        checkpoints.check_output_dir(adapter_out, full, overwrite=False)


# ----------------------------------------------------------------------------- training, saving, loading

def test_lora_lowers_the_loss_and_saves_a_merged_model_and_its_adapter_that_reload(no_pad_model_dir, data, tmp_path):
    """With gradient checkpointing, on a model without a pad token. The merged folder loads with plain transformers,
    the adapter with peft (and with utils' loader, base model from adapter_config.json), all with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    trainer = train.train(lora_args(no_pad_model_dir, data, out, "--max_steps", "8", "--save_strategy", "no",
                                    "--activation_checkpointing", "True"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "[PAD]"  # added by train.py: the vocabulary grew by one
    records = short_records(16)
    base = AutoModelForCausalLM.from_pretrained(no_pad_model_dir)
    base.resize_token_embeddings(len(tokenizer))
    merged = AutoModelForCausalLM.from_pretrained(out)  # no peft, no project code
    assert mean_loss(merged, tokenizer, records) < mean_loss(base, tokenizer, records) - 0.05

    adapter = out / checkpoints.ADAPTER_DIR
    assert (adapter / "adapter_model.safetensors").is_file() and not list(out.rglob("*.bin"))
    config = json.loads((adapter / utils.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(no_pad_model_dir) and config["r"] == 8
    assert set(config["target_modules"]) == set(train.LORA_TARGETS)
    assert utils.recorded_prompt_style(out) == utils.recorded_prompt_style(adapter) == "alpaca"
    assert merged.generation_config.eos_token_id == tokenizer.eos_token_id
    assert not list(out.glob("tmp-*"))

    expected = logits(merged, tokenizer)
    with_peft = PeftModel.from_pretrained(base, str(adapter))  # the base, resized as the adapter's tokenizer says
    torch.testing.assert_close(logits(with_peft, tokenizer), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(trainer.model, tokenizer), expected, rtol=0, atol=1e-5)
    loaded = utils.load_model(adapter)  # what chat.py and eval.py do with an adapter folder
    assert type(loaded).__name__ == "LlamaForCausalLM"  # merged on load: a plain model
    torch.testing.assert_close(logits(loaded, utils.load_tokenizer(adapter)), expected, rtol=0, atol=1e-5)


def test_stage2_from_an_adapter_only_stage1_and_a_missing_base(tiny_model_dir, data, tmp_path, capsys):
    """--merge_lora False: output_dir is the adapter, and utils' loader (train.py's model loading, chat.py, eval.py)
    takes it as a model, so stage 2 trains from it. A base model that has moved away is one clear line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train.main(lora_args(tiny_model_dir, data, stage1, "--max_steps", "2", "--save_strategy", "no",
                         "--merge_lora", "False"))
    assert (stage1 / "adapter_model.safetensors").is_file() and (stage1 / "tokenizer.json").is_file()
    assert not (stage1 / "config.json").exists() and not (stage1 / "model.safetensors").exists()
    assert not list(stage1.glob("*.bin")) and utils.recorded_prompt_style(stage1) == "alpaca"
    capsys.readouterr()
    assert chat.main(tiny_args(stage1, "--prompt", "I have a headache")) == 0  # chat.py takes the adapter folder
    assert "prompt alpaca" in capsys.readouterr().err

    train.main(lora_args(stage1, data, stage2, "--max_steps", "2", "--save_strategy", "no", "--packing", "True"))
    assert json.loads((stage2 / "adapter" / utils.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(stage1)
    assert checkpoints.read_fingerprint(stage2)["model"]["run"] == checkpoints.read_fingerprint(stage1)["digest"]
    tokenizer = AutoTokenizer.from_pretrained(stage2)
    torch.testing.assert_close(logits(utils.load_model(stage2 / "adapter"), tokenizer),
                               logits(AutoModelForCausalLM.from_pretrained(stage2), tokenizer), rtol=0, atol=1e-5)

    config = json.loads((stage1 / utils.ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (stage1 / utils.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        train.main(lora_args(stage1, data, tmp_path / "stage2-again"))
    [line] = error_lines(capsys.readouterr().err)
    assert f"{stage1 / utils.ADAPTER_CONFIG}: base model {tmp_path / 'moved-away'}: model folder not found" in line
    assert not (tmp_path / "stage2-again").exists()


# ----------------------------------------------------------------------------- resume and torchrun

@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_uninterrupted_runs_adapter(tiny_model_dir, data, tmp_path, caplog):
    """As tests/test_reliability.py does for full fine-tuning: SIGKILL while checkpoint-4 is saved, the same command
    again resumes from checkpoint-2 (adapter weights, optimizer, scheduler, RNG) and ends where a run never killed
    ends."""
    def run(name):
        return lora_args(tiny_model_dir, data, tmp_path / name, "--max_steps", "6", "--save_strategy", "steps",
                         "--save_steps", "2", "--lr_scheduler_type", "cosine", "--warmup_steps", "1",
                         "--packing", "True")

    train.main(run("reference"))
    args = run("killed")
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert checkpoints.checkpoint_problem(out / "checkpoint-2") is None
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()  # a LoRA checkpoint holds the adapter
    assert not (out / "checkpoint-2" / "model.safetensors").exists()  # and not the frozen model
    assert not (out / "checkpoint-4").exists()

    with caplog.at_level("INFO", logger="chatdoctor"):
        train.main(args)
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    adapter = Path(checkpoints.ADAPTER_DIR) / "adapter_model.safetensors"
    assert max_difference(out / adapter, tmp_path / "reference" / adapter) < 1e-4
    assert max_difference(out / "model.safetensors", tmp_path / "reference" / "model.safetensors") < 1e-4
    assert not list(out.glob("tmp-*"))


@pytest.mark.slow
def test_lora_under_torchrun_with_two_cpu_ranks(tiny_model_dir, data, tmp_path):
    out = tmp_path / "out"
    result = run_train(lora_args(tiny_model_dir, data, out, "--max_steps", "2", "--save_strategy", "no"),
                       torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "strategy: DDP over 2 CPU processes (gloo)" in log and "LoRA r=8" in log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    adapter = load_file(out / checkpoints.ADAPTER_DIR / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and weight.abs().max() > 0 for name, weight in adapter.items())
    assert (out / "model.safetensors").is_file() and not list(out.glob("tmp-*"))
