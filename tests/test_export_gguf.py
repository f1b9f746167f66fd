"""export_gguf.py: the GGUF loads back (transformers' GGUF reader) with the HF model's logits, the same token ids and
chat.py's chat template; bad input is one line and leaves nothing behind; prepare.py converts a GGUF back."""
import json
import shutil
import subprocess

import pytest
import torch

import export_gguf
import prepare
import prompts
from prompts import CHATDOCTOR_INSTRUCTION

SAMPLES = [
    "Doctor, I have had a fever of 39.5 C for 3 days and my 2-year-old coughs.",
    "Patient: what's this rash?\n\nChatDoctor: <|im_end|> it's {{ nothing }} 1234567 émoji 🤒\t  spaces  ",
    prompts.build_chat_prompt([("Patient", "I have a cough."), ("ChatDoctor", "How long?"), ("Patient", "Weeks.")],
                           "alpaca"),
]
# Largest |logit difference| to the HF model, as a share of the largest |logit|: f16 rounds each weight to about
# 3 significant digits, q8_0 to about 2.
TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def sharp_tiny_dir(tmp_path_factory, tiny_model_dir):
    """The tiny LLaMA with q and k scaled up so that attention is peaked: at the default initialisation every
    token attends almost evenly, and a wrong q/k row order would not show in the logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharp-tiny")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
        model.model.embed_tokens.weight.mul_(20)
    model.save_pretrained(out)
    prepare.write_chat_template(out)
    return out


def export(model_dir, out, file_type="f16", **kwargs):
    return export_gguf.export(model_dir, out, file_type, **kwargs)["out"]


def gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def compare_logits(model_dir, gguf_path):
    """(largest |logit difference| / largest |logit|, share of positions with the same most likely token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(SAMPLES[0] + SAMPLES[1], return_tensors="pt").input_ids
    expected = logits_of(hf_model, ids)
    got = logits_of(gguf_model(gguf_path), ids)
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    return ((got - expected).abs().max() / expected.abs().max()).item(), agreement


def relative_logit_error(model_dir, gguf_path):
    return compare_logits(model_dir, gguf_path)[0]


def gguf_fields(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    return fields, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_gguf_round_trip_logits_tokens_and_template(sharp_tiny_dir, tmp_path, file_type):
    from transformers import AutoTokenizer

    path = export(sharp_tiny_dir, tmp_path / "chatdoctor.gguf", file_type)
    assert relative_logit_error(sharp_tiny_dir, path) < TOLERANCE[file_type]
    hf_tokenizer = AutoTokenizer.from_pretrained(sharp_tiny_dir)
    from_gguf = gguf_tokenizer(path)
    for text in SAMPLES:
        assert from_gguf(text).input_ids == hf_tokenizer(text).input_ids
    assert from_gguf.chat_template == hf_tokenizer.chat_template == prompts.chat_template_for("chatdoctor")
    assert from_gguf.eos_token == hf_tokenizer.eos_token

    fields, tensors = gguf_fields(path)
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "ChatDoctor"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == hf_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == prompts.chat_template_for("chatdoctor")
    assert tensors["blk.0.attn_q.weight"] == file_type.upper() and tensors["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in tensors  # tied to token_embd, as in the HF model


def test_wrong_q_k_row_order_would_be_caught(sharp_tiny_dir, tmp_path, monkeypatch):
    """The logit check has teeth: without llama.cpp's q/k permutation the error is far past the tolerance."""
    monkeypatch.setattr(export_gguf, "permute_for_llama_cpp", lambda weights, n_heads: weights)
    path = export(sharp_tiny_dir, tmp_path / "unpermuted.gguf")
    assert relative_logit_error(sharp_tiny_dir, path) > 10 * TOLERANCE["q8_0"]


def test_trained_folder_exports_the_alpaca_template_and_a_modelfile(trained_tiny_dir, tmp_path, capsys):
    export_gguf.main([str(trained_tiny_dir), "--out", str(tmp_path / "chatdoctor.gguf"), "--type", "q8_0"])
    assert "alpaca prompt" in capsys.readouterr().out
    tokenizer = gguf_tokenizer(tmp_path / "chatdoctor.gguf")
    assert tokenizer.chat_template == prompts.chat_template_for("alpaca")
    messages = prompts.messages_of([("Patient", "I have a cough.")])
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        prompts.build_chat_prompt([("Patient", "I have a cough.")], "alpaca"))
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "FROM ./chatdoctor.gguf\n" in modelfile and "research model" in modelfile
    assert 'PARAMETER stop "Patient:"' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "SYSTEM" not in modelfile
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "chatdoctor.gguf"]


def test_prepare_converts_an_exported_gguf_with_the_chatdoctor_template(sharp_tiny_dir, tmp_path):
    """prepare.make_model's conversion of the embedded default, on a tiny GGUF: SmolLM's ChatML is replaced."""
    gguf_path = export(sharp_tiny_dir, tmp_path / "tiny.gguf")
    converted = prepare.make_model(tmp_path / "converted", gguf_path=gguf_path)
    template = (converted / "chat_template.jinja").read_text()
    assert template == prompts.chat_template_for("chatdoctor") and "im_start" not in template
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    turns = [("Patient", "I have a cough."), ("ChatDoctor", "How long?"), ("Patient", "Weeks.")]
    assert tokenizer.apply_chat_template(prompts.messages_of(turns), add_generation_prompt=True, tokenize=False) == (
        prompts.build_chat_prompt(turns, "chatdoctor"))


# ----------------------------------------------------------------------------- bad input

def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        export_gguf.main([str(a) for a in argv])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err.strip()


def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out" / "chatdoctor.gguf"
    assert run_main(capsys, tmp_path / "nowhere", "--out", out) == f"error: {tmp_path / 'nowhere'}: model folder not found"

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2LMHeadModel"])))
    assert "config.json: architectures ['GPT2LMHeadModel'] is not LlamaForCausalLM" in run_main(
        capsys, gpt2, "--out", out)

    assert not (tmp_path / "out").exists()
    out.parent.mkdir()
    out.write_bytes(b"an older export")
    assert run_main(capsys, tiny_model_dir, "--out", out) == f"error: {out}: already exists (--overwrite replaces it)"
    assert out.read_bytes() == b"an older export" and sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_a_failure_mid_export_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    def one_tensor_then_disk_full(*args):
        yield next(iter(original(*args)))
        raise OSError("No space left on device")

    original = export_gguf.gguf_tensors
    monkeypatch.setattr(export_gguf, "gguf_tensors", one_tensor_then_disk_full)
    with pytest.raises(export_gguf.ExportError, match=r"chatdoctor.gguf: cannot write \(No space left on device\)"):
        export(tiny_model_dir, tmp_path / "chatdoctor.gguf")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Ollama's template

GO_RENDER = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string; Content string }
func main() {
	var data struct { Messages []Message }
	json.NewDecoder(os.Stdin).Decode(&data)
	tmpl := template.Must(template.New("t").Parse(os.Args[1]))
	if err := tmpl.Execute(os.Stdout, data); err != nil { panic(err) }
}
"""


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    """Go's text/template, which Ollama renders its TEMPLATE with (skipped where no Go toolchain is installed)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to render Ollama's template with")
    work = tmp_path_factory.mktemp("go")
    (work / "render.go").write_text(GO_RENDER)
    subprocess.run([go, "build", "-o", str(work / "render"), str(work / "render.go")], check=True, cwd=work,
                   env={"HOME": str(work), "GOCACHE": str(work / "cache"), "PATH": "/usr/bin:/bin"})
    return lambda template, messages: subprocess.run(
        [str(work / "render"), template], input=json.dumps({"Messages": messages}), capture_output=True, text=True,
        check=True).stdout


@pytest.mark.parametrize("style", ["chatdoctor", "alpaca"])
def test_ollama_template_renders_chat_pys_prompt(go_renderer, style):
    awkward = 'it {{ hurts }} "quoted" %s %d\n\tnewline 🤒'
    for turns in ([("Patient", "I have a cough.")], [("Patient", "")],
                  [("Patient", awkward), ("ChatDoctor", "How long?"), ("Patient", "Weeks.")],
                  [("Patient", "a"), ("ChatDoctor", awkward), ("Patient", "b"), ("ChatDoctor", "c"), ("Patient", "d")]):
        for instruction in (None, "Answer briefly."):
            extra = {} if instruction is None else {"instruction": instruction}
            rendered = go_renderer(prompts.ollama_template(style), prompts.messages_of(turns, instruction))
            assert rendered == prompts.build_chat_prompt(turns, style, **extra)
    assert CHATDOCTOR_INSTRUCTION in go_renderer(prompts.ollama_template(style), [])


# ----------------------------------------------------------------------------- the real model

# The trained 135M model (`make demo`'s pretrained) measured 0.0012 (f16) and 0.061 (q8_0: the tied embedding and
# output matrix are 8-bit too), with the same most likely token at 100% and 98% of positions.
REAL_TOLERANCE = {"f16": 5e-3, "q8_0": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_embedded_model_round_trip(embedded_model_dir, tmp_path, file_type):
    """The 135M SmolLM2 (30 layers, 3 k/v heads for 9 query heads): real attention, real text."""
    path = export(embedded_model_dir, tmp_path / "smollm2.gguf", file_type)
    error, agreement = compare_logits(embedded_model_dir, path)
    assert error < REAL_TOLERANCE[file_type] and agreement >= 0.95
