"""Prompt templates, data readers, supervised tokenization, pad tokens, collation."""
import json
import sys
from pathlib import Path

import pytest
import torch

import utils
from conftest import BAD_FILES
from utils import IGNORE_INDEX, DataError, build_prompt, load_data, load_records, tokenize_supervised

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from original_preprocess import original_supervised_dataset  # noqa: E402



def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- templates

def test_alpaca_templates_are_verbatim():
    with_input = build_prompt({"instruction": "Do X.", "input": "some text", "output": "y"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\nsome text\n\n### Response:"
    )
    without_input = build_prompt({"instruction": "Do X.", "input": "", "output": "y"})
    assert without_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response:"
    )


# ----------------------------------------------------------------------------- tokenization

def test_loss_only_on_response_which_ends_in_eos(tokenizer):
    record = {"instruction": utils.CHATDOCTOR_INSTRUCTION, "input": "I have a cough.", "output": "Take rest."}
    [example] = tokenize_supervised([record], tokenizer, 512)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer) == "Take rest." + tokenizer.eos_token
    n_prompt = labels.count(IGNORE_INDEX)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # masked part is exactly the prefix
    assert tokenizer.decode(ids[:n_prompt]) == build_prompt(record)
    assert labels[n_prompt:] == ids[n_prompt:]


def test_identical_to_original_preprocessing_on_real_data(tokenizer):
    records = load_records(utils.GENMEDGPT_PATH)[:150] + load_records(utils.ALPACA_SAMPLE_PATH)[:150]
    tokenizer.model_max_length = 512
    ours = tokenize_supervised(records, tokenizer, 512)
    original = original_supervised_dataset(records, tokenizer)
    untruncated = [i for i, ids in enumerate(original["input_ids"]) if len(ids) < 512]
    assert len(untruncated) > 250
    ours_by_index = dict(enumerate(ours))  # nothing is dropped at 512 for these records
    assert len(ours) == len(records)
    for i in untruncated:
        assert ours_by_index[i]["input_ids"] == original["input_ids"][i].tolist(), f"record {i}"
        assert ours_by_index[i]["labels"] == original["labels"][i].tolist(), f"record {i}"


def test_fully_truncated_responses_are_dropped_and_counted(tokenizer, caplog):
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "kept?"}
    short = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    with caplog.at_level("WARNING", logger="chatdoctor"):
        examples = tokenize_supervised([short, long_prompt, short], tokenizer, 64)
    assert len(examples) == 2
    assert all(any(t != IGNORE_INDEX for t in e["labels"]) for e in examples)
    assert "dropped 1 of 3 records" in caplog.text


def test_partly_truncated_response_is_kept_at_max_length(tokenizer):
    record = {"instruction": "Say a lot.", "input": "", "output": "blah " * 300}
    [example] = tokenize_supervised([record], tokenizer, 100)
    assert len(example["input_ids"]) == 100
    assert example["labels"][-1] != IGNORE_INDEX


def test_cache_returns_same_examples_and_keys_on_length(tokenizer, tmp_path):
    records = load_records(utils.GENMEDGPT_PATH)[:40]
    first = utils.tokenize_cached(records, tokenizer, 256, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = utils.tokenize_cached(records, tokenizer, 256, tmp_path)
    assert again == first == tokenize_supervised(records, tokenizer, 256)
    utils.tokenize_cached(records, tokenizer, 128, tmp_path)
    utils.tokenize_cached(records[:-1], tokenizer, 256, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 3
    assert not list(tmp_path.glob("*.tmp*"))


# ----------------------------------------------------------------------------- collation

def test_padded_batch_keeps_eos_visible_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: the trap this guards against
    records = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": "x y z", "output": "bc"}]
    examples = tokenize_supervised(records, tokenizer, 512)
    batch = utils.collate_padded(examples, tokenizer.pad_token_id)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert batch["input_ids"][row, n - 1] == tokenizer.eos_token_id
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------- formats

def test_alpaca_json_jsonl_and_missing_input(tmp_path):
    records = [{"instruction": "i1", "input": "x", "output": "o1"}, {"instruction": "i2", "output": "o2"}]
    from_json = load_records(write(tmp_path / "a.json", records))
    from_jsonl = load_records(write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in records) + "\n"))
    assert from_json == from_jsonl == [
        {"instruction": "i1", "input": "x", "output": "o1"}, {"instruction": "i2", "input": "", "output": "o2"}
    ]


def test_healthcaremagic_format(tmp_path):
    hcm = [{"instruction": utils.CHATDOCTOR_INSTRUCTION, "input": "Hi doctor, my knee hurts.", "output": "Hi, ..."}]
    assert load_records(write(tmp_path / "HealthCareMagic-100k.json", hcm)) == hcm


def test_icliniq_format_uses_chatdoctor_instruction_and_icliniq_answer(tmp_path):
    icliniq = [{"input": "Hello doctor, I have acne.", "answer_icliniq": "Hi. Use benzoyl peroxide.",
                "answer_chatgpt": "gpt", "answer_chatdoctor": "cd"}]
    [record] = load_records(write(tmp_path / "iCliniq.json", icliniq))
    assert record == {"instruction": utils.CHATDOCTOR_INSTRUCTION, "input": "Hello doctor, I have acne.",
                      "output": "Hi. Use benzoyl peroxide."}


def test_several_files_comma_separated(tmp_path):
    a = write(tmp_path / "a.json", [{"instruction": "a", "output": "1"}])
    b = write(tmp_path / "b.jsonl", json.dumps({"instruction": "b", "output": "2"}) + "\n")
    assert [r["instruction"] for r in load_data(f"{a},{b}")] == ["a", "b"]


def test_bundled_data_is_the_published_bytes():
    for path, digest in utils.BUNDLED_SHA256.items():
        assert utils.sha256_of(path) == digest, path
    assert len(load_records(utils.GENMEDGPT_PATH)) == 5452
    assert len(load_records(utils.ALPACA_SAMPLE_PATH)) == 999
    assert utils.ALPACA_SAMPLE_PATH.stat().st_size == utils.ALPACA_SAMPLE_BYTES


def test_make_data_writes_only_derived_files(tmp_path):
    import prepare

    tracked = {path: path.read_bytes() for path in utils.BUNDLED_SHA256}
    manifest = prepare.make_data(out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANIFEST.json", "genmedgpt_heldout.json",
                                                          "genmedgpt_train.json"]
    assert {path: path.read_bytes() for path in tracked} == tracked
    assert manifest["derived"]["genmedgpt_train.json"]["records"] == 5251
    assert all(row["bundled"] for row in manifest["inputs"].values())


def test_make_data_refuses_a_changed_genmedgpt(tmp_path):
    import prepare

    changed = tmp_path / "chatdoctor5k.json"
    changed.write_bytes(utils.GENMEDGPT_PATH.read_bytes().replace(b"fever", b"fevers", 1))
    with pytest.raises(DataError, match=r"chatdoctor5k.json: sha256 .* is not GenMedGPT-5k's"):
        prepare.make_data(changed, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_alpaca_sample_recognised_by_content(tmp_path):
    copy = tmp_path / "alpaca_data.json"
    copy.write_bytes(utils.ALPACA_SAMPLE_PATH.read_bytes())
    assert utils.is_alpaca_sample(copy)
    copy.write_bytes(copy.read_bytes().replace(b"a", b"b", 1))  # same size, other content
    assert not utils.is_alpaca_sample(copy)
    assert not utils.is_alpaca_sample(tmp_path / "missing.json")


def test_no_code_reads_outside_the_repository():
    """A clone runs with nothing beside it: no source file names the folder next to the checkout."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "*.py", "Makefile", ".ci/*", "*.ini"], cwd=utils.ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    needle = "../sha" + "red"  # spelled in two pieces so that this test does not find itself
    assert not [f for f in files if needle in (utils.ROOT / f).read_text()]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_gives_one_line_error_naming_file_record_field(tmp_path, name):
    content, expected = BAD_FILES[name]
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_invalid_utf8_and_directory(tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_records(bad)
    with pytest.raises(DataError, match="is a directory"):
        load_records(tmp_path)


# ----------------------------------------------------------------------------- pad tokens

def _tiny(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def test_tokenizer_with_pad_is_left_alone(tokenizer):
    model = _tiny(tokenizer)
    before = (len(tokenizer), tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert utils.ensure_pad_token(tokenizer, model) is False
    assert (len(tokenizer), tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == before


def test_tokenizer_without_pad_gets_mean_initialised_pad(embedded_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.pad_token = None
    bos, eos, n = tokenizer.bos_token, tokenizer.eos_token, len(tokenizer)
    model = _tiny(tokenizer)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert utils.ensure_pad_token(tokenizer, model) is True
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == n and len(tokenizer) == n + 1
    assert (tokenizer.bos_token, tokenizer.eos_token) == (bos, eos)  # the model's own, never "</s>"
    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape[0] == n + 1 and new_out.shape[0] == n + 1
    torch.testing.assert_close(new_in[-1], old_in.mean(0))
    torch.testing.assert_close(new_out[-1], old_out.mean(0))
    assert model.config.pad_token_id == n
