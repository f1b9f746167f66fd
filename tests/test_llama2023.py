"""The paper's base model as a 2023 Hugging Face conversion of LLaMA loads, trains and chats.

The folder is built here as those conversions were: a sentencepiece tokenizer.model only, the pre-release
class names LLaMATokenizer / LLaMAForCausalLM, bos/eos/unk saved as "", fp16 weights in pickle .bin shards.
"""
import io
import json
import random
import shutil
import sys

import pytest
import torch

import chat
import train
import utils

WORDS = (
    "patient doctor fever cough headache pain throat chest blood pressure sleep tired week days rest water "
    "medicine tablet answer question symptoms infection swollen neck glands stomach should take see my have "
    "had I you what do it is the a of and to for with in"
).split()
QUESTION = "I have had a fever and a sore throat for three days"


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def train_sentencepiece(path):
    """A BPE tokenizer.model numbered as LLaMA's (unk 0, bos 1, eos 2), learnt from the prompt
    templates and generated text, so the Alpaca prompt takes few tokens."""
    import sentencepiece

    rng = random.Random(0)
    lines = [utils.build_prompt({"instruction": utils.CHATDOCTOR_INSTRUCTION, "input": "x"}),
             utils.build_prompt({"instruction": "x", "input": ""})] * 50
    lines += [sentence(rng, rng.randint(4, 16)) for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def save_bin_shards(state_dict, folder, n_shards=2):
    """pytorch_model-0000i-of-0000n.bin pickles and their index, as save_pretrained wrote them in 2023."""
    names = list(state_dict)
    weight_map = {}
    for i in range(n_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        keys = names[i::n_shards]
        torch.save({k: state_dict[k].clone() for k in keys}, folder / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2))


def make_llama_2023(folder):
    """The folder, and the random model it holds (weights rounded to fp16, as saved, then back to fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    train_sentencepiece(folder / "tokenizer.model")
    config = {  # decapoda-research/llama-7b-hf's config.json, with tiny sizes and LLaMA's real bos/eos ids
        "architectures": ["LLaMAForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 32, "intermediate_size": 64, "initializer_range": 0.02, "max_sequence_length": 2048,
        "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": -1,
        "rms_norm_eps": 1e-06, "torch_dtype": "float16", "transformers_version": "4.27.0.dev0", "use_cache": True,
        "vocab_size": 400,
    }
    write_json(folder / "config.json", config)
    write_json(folder / "tokenizer_config.json", {
        "bos_token": "", "eos_token": "", "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "LLaMATokenizer", "unk_token": "",
    })
    write_json(folder / "special_tokens_map.json", {"bos_token": "", "eos_token": "", "unk_token": ""})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "pad_token_id"})).half()
    save_bin_shards(model.state_dict(), folder)
    return model.float().eval()


@pytest.fixture(scope="module")
def llama2023(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama2023") / "llama-7b-hf"
    return folder, make_llama_2023(folder)


def test_the_folder_is_a_2023_conversion(llama2023):
    folder, _ = llama2023
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json",
    ]


def test_tokenizer_gets_its_special_tokens_from_tokenizer_model(llama2023, caplog):
    import sentencepiece

    folder, _ = llama2023
    with caplog.at_level("INFO", logger="chatdoctor"):
        tokenizer = utils.load_tokenizer(folder)
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert tokenizer(QUESTION)["input_ids"] == [1] + sp.encode(QUESTION)  # BOS, then the sentencepiece pieces
    assert tokenizer.decode(tokenizer(QUESTION + "</s>")["input_ids"], skip_special_tokens=True) == QUESTION
    repairs = [r.getMessage() for r in caplog.records if r.name == "chatdoctor"]
    assert len(repairs) == 1
    assert "bos <s> (id 1), eos </s> (id 2), unk <unk> (id 0); BOS added" in repairs[0]


@pytest.mark.parametrize("package", ["sentencepiece", "google.protobuf"])
def test_without_sentencepiece_or_protobuf_the_error_says_so(llama2023, monkeypatch, package):
    folder, _ = llama2023
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(utils.ModelLoadError, match="llama-7b-hf: reading tokenizer.model needs sentencepiece and "
                                                   "protobuf"):
        utils.load_tokenizer(folder)


def test_model_loads_from_bin_shards_with_the_saved_weights(llama2023):
    folder, original = llama2023
    model = utils.load_model(folder, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    x = torch.tensor([[1, 5, 42, 300, 399, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, original(x).logits, rtol=0, atol=1e-6)


class RunsCode:
    """A pickle payload: unpickling it runs code that writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_bin_shards_are_unpickled_weights_only(llama2023, tmp_path):
    folder, _ = llama2023
    poisoned = shutil.copytree(folder, tmp_path / "poisoned")
    shard = poisoned / "pytorch_model-00002-of-00002.bin"
    marker = tmp_path / "code-ran"
    torch.save({**torch.load(shard, weights_only=True), "payload": RunsCode(marker)}, shard)

    with pytest.raises(utils.ModelLoadError, match=r"poisoned: cannot load model \(Weights only load failed"):
        utils.load_model(poisoned)
    assert not marker.exists()
    torch.load(shard, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.read_text() == "ran"


# The seed README's command (train.py's docstring), shortened to two steps of the tiny model.
PAPER_FLAGS = [
    "--bf16", "True", "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "8", "--evaluation_strategy", "no",
    "--save_strategy", "steps", "--save_steps", "2000", "--save_total_limit", "1", "--learning_rate", "2e-5",
    "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
    "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LLaMADecoderLayer", "--tf32", "True",
    "--max_steps", "2", "--model_max_length", "256", "--report_to", "none",
]


@pytest.fixture(scope="module")
def trained(llama2023, tmp_path_factory):
    folder, _ = llama2023
    work = tmp_path_factory.mktemp("train2023")
    rng = random.Random(1)
    records = [{"instruction": utils.CHATDOCTOR_INSTRUCTION, "input": sentence(rng, 10), "output": sentence(rng, 8)}
               for _ in range(64)]
    write_json(work / "data.json", records)
    out = work / "pretrained"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: thread hand-offs cost more than they share (30 s -> 4 s here)
    try:
        trainer = train.train(["--model_name_or_path", str(folder), "--data_path", str(work / "data.json"),
                               "--output_dir", str(out), "--cache_dir", str(work / "cache"), *PAPER_FLAGS])
    finally:
        torch.set_num_threads(threads)
    return out, trainer


def test_train_runs_the_paper_command_on_it(trained):
    out, trainer = trained
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_trained_folder_loads_without_project_code(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trainer = trained
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token, tokenizer.bos_token_id, tokenizer.eos_token, tokenizer.eos_token_id) == \
        ("<s>", 1, "</s>", 2)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == 400
    ids = tokenizer(QUESTION)["input_ids"]
    assert ids[0] == 1 and 1 not in ids[1:] and 2 not in ids  # one BOS added; EOS only where the data puts it
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 400
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, trainer.model.to("cpu").eval()(x).logits, rtol=0, atol=1e-6)


def test_chat_answers_one_prompt_with_the_trained_folder(trained, capsys):
    out, _ = trained
    argv = ["--model_path", str(out), "--greedy", "--max_new_tokens", "8", "--prompt", QUESTION]
    assert chat.main(argv) == 0
    printed, err = capsys.readouterr()
    args = chat.parse_args(argv)
    settings = chat.settings_from(args, chat.EngineSettings)
    model, tokenizer, _, _ = chat.load_chat_model(settings)
    session = chat.Engine(settings, model, tokenizer).new_chat(chat.settings_from(args, chat.GenerationSettings))
    assert session.encode(QUESTION)[0] == tokenizer.bos_token_id
    expected = session.respond(QUESTION)
    assert expected and printed == expected + "\n"
    assert "Traceback" not in err
