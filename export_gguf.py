"""Export a ChatDoctor model folder to one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.

    python export_gguf.py pretrained --out chatdoctor.gguf              # f16 (norms stay f32)
    python export_gguf.py pretrained --out chatdoctor.gguf --type q8_0  # 8-bit weights, about half the size
    ollama create chatdoctor -f Modelfile                                # from the output's folder
    llama-server -m chatdoctor.gguf --jinja                              # llama.cpp renders the GGUF's template

Reads what train.py and prepare.py write: a LlamaForCausalLM folder of safetensors with a byte-level BPE tokenizer
(GPT-2 style, as SmolLM2's). The GGUF's chat template is chat.py's prompt for the model (prompts.chat_template_for),
so llama.cpp prompts it as chat.py does; the Modelfile says the same prompt in Ollama's Go template syntax.
"""
import argparse
import errno
import json
import os
import re
from pathlib import Path

from prompts import SAFETY_NOTICE, STOP_STRINGS, chat_template_for, ollama_template
from utils import (ModelLoadError, check_model_path, display_path, fail, load_tokenizer, prompt_style_for,
                   removed_unless_finished, write_atomic)

ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM")  # the second: a 2023 LLaMA folder's spelling
FILE_TYPES = ("f16", "q8_0")
# llama.cpp names the regex that splits text before BPE; these are the tokenizer.json pre-tokenizers it matches.
LLAMA_CPP_PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}): "gpt-2",
}


class ExportError(ValueError):
    """A folder or an output this script cannot export to: the message names the file and the field."""


# ----------------------------------------------------------------------------- checks

def read_config(folder):
    """The folder's config, once it is known to be a Llama this script can write (one-line errors otherwise)."""
    from transformers import AutoConfig

    check_model_path(folder, local=True)
    path = Path(folder) / "config.json"
    try:
        architectures = json.loads(path.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, AttributeError):
        raise ExportError(f"{path}: not a JSON object") from None
    if not set(architectures) & set(ARCHITECTURES):
        raise ExportError(f"{path}: architectures {architectures} is not LlamaForCausalLM, the one this exports")
    if not list(Path(folder).glob("*.safetensors")):
        raise ExportError(f"{folder}: no *.safetensors weights (this exports safetensors only)")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise ExportError(f"{path}: rope_type {rope!r} is not exported (only plain RoPE)")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(config, field, False):
            raise ExportError(f"{path}: {field} true is not exported")
    return config


def check_outputs(paths, overwrite):
    for folder in (paths[0].parent, *paths[0].parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ExportError(f"{folder}: is a file, not a folder (the --out path goes through it)")
            break
    for path in paths:
        if path.exists() and not overwrite:
            raise ExportError(f"{path}: already exists (--overwrite replaces it)")
        if path.is_dir():
            raise ExportError(f"{path}: is a folder, not a file")


# ----------------------------------------------------------------------------- tensors

def hf_tensors(folder):
    """(name, slice) for every tensor of the folder's safetensors files: slice[:] reads that one tensor."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def left_out(name, config):
    """Tensors llama.cpp does without: rotary frequencies it computes, an output matrix tied to the embeddings."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def permute_for_llama_cpp(weights, n_heads):
    """llama.cpp's rotary embedding pairs neighbouring dimensions, Hugging Face's pairs the two halves of a head:
    q and k rows are reordered head by head (convert_hf_to_gguf.py's LlamaModel.permute; transformers' GGUF
    loader undoes it)."""
    return (weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def encode(weights, file_type):
    """(data, ggml type) as llama.cpp's converter stores it: 1-D tensors (norms) as f32, matrices as f16, or as
    q8_0 where rows split into its 32-value blocks."""
    import gguf

    if weights.ndim == 1:
        return weights.astype("float32"), gguf.GGMLQuantizationType.F32
    if file_type == "q8_0" and weights.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return weights.astype("float16"), gguf.GGMLQuantizationType.F16


def gguf_tensors(folder, config, file_type):
    """(llama.cpp name, data, ggml type) for every weight of the model."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in hf_tensors(folder):
        if left_out(name, config):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{folder}: tensor {name} has no llama.cpp name")
        weights = tensor[:].float().numpy()
        if name.endswith("self_attn.q_proj.weight"):
            weights = permute_for_llama_cpp(weights, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weights = permute_for_llama_cpp(weights, config.num_key_value_heads)
        yield (gguf_name, *encode(weights, file_type))


# ----------------------------------------------------------------------------- tokenizer

def byte_level_vocabulary(folder, vocab_size):
    """tokens, token types, merges and llama.cpp's pre-tokenizer name from tokenizer.json (byte-level BPE only)."""
    import gguf

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path}: file not found (the export reads the fast tokenizer's file)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    pre = LLAMA_CPP_PRE_TOKENIZERS.get(json.dumps(spec.get("pre_tokenizer")))
    if model.get("type") != "BPE" or pre is None:
        raise ExportError(f"{path}: model {model.get('type')!r} with pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))}"
                          " is not a byte-level BPE tokenizer this exports (GPT-2 style, as SmolLM2's)")
    by_id = {i: token for token, i in model["vocab"].items()}
    kinds = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise ExportError(f"{path}: token id {max(by_id)} is past the model's {vocab_size} embeddings")
    # Embedding rows no token uses still need a name in llama.cpp's vocabulary.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, pre


def add_tokenizer(writer, folder, vocab_size, chat_template):
    tokens, types, merges, pre = byte_level_vocabulary(folder, vocab_size)
    tokenizer = load_tokenizer(folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    for name, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    ids = tokenizer("a")["input_ids"]  # what the tokenizer adds around any text, llama.cpp must add too
    writer.add_add_bos_token(special["bos"] is not None and ids[0] == special["bos"])
    writer.add_add_eos_token(special["eos"] is not None and ids[-1] == special["eos"])
    writer.add_chat_template(chat_template)
    return tokenizer


# ----------------------------------------------------------------------------- Ollama

def modelfile_text(gguf_name, style, eos_token, source):
    stops = [*STOP_STRINGS, *([eos_token] if eos_token else [])]
    return "\n".join([
        f"# ChatDoctor, exported by export_gguf.py from {source} ({style} prompt, as chat.py prompts it).",
        f"# {SAFETY_NOTICE}",
        "# ollama create chatdoctor -f Modelfile && ollama run chatdoctor",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{ollama_template(style)}"""',
        *[f"PARAMETER stop {json.dumps(stop)}" for stop in stops],
        "",
    ])


# ----------------------------------------------------------------------------- export

def export(folder, out, file_type="f16", overwrite=False):
    """Write `out` (GGUF), then a Modelfile beside it; both appear whole or neither does. Returns a summary dict.
    File-system errors (read-only folder, disk full) are one-line ExportErrors naming the file."""
    folder, out = Path(folder), Path(out)
    try:
        return write_export(folder, out, file_type, overwrite)
    except OSError as e:  # the folder read, or the outputs written: one line naming the file
        raise ExportError(file_system_error(e, out)) from None


# A file-size limit (RLIMIT_FSIZE) fails a write as a full disk does.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def file_system_error(error, path):
    """One line for an OSError met while exporting to `path`: a failed write() names no file, and a temporary file
    is named as the output it was to become."""
    short_write = error.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(error))  # numpy's tofile
    disk_full = error.errno in DISK_FULL or short_write
    reason = "disk full" if disk_full else error.strerror or str(error) or type(error).__name__
    named = error.filename and not re.fullmatch(r"\..+\.tmp\d+(-.*)?", Path(os.fsdecode(error.filename)).name)
    if named and Path(os.fsdecode(error.filename)) not in (path, path.parent):
        return f"{display_path(error.filename)}: {reason}"
    return f"{display_path(path)}: cannot write ({reason})"


def set_gguf_parameters(writer, config, style, file_type):
    """The hyperparameters llama.cpp reads (as convert_hf_to_gguf.py's set_gguf_parameters writes them)."""
    import gguf

    writer.add_name("ChatDoctor")
    writer.add_description(f"ChatDoctor ({style} prompt). {SAFETY_NOTICE}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if file_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tensors(writer, folder, config, file_type, desc):
    """The weights under llama.cpp's names, converted to `file_type` one at a time (a progress bar per tensor)."""
    from tqdm import tqdm

    count = sum(not left_out(name, config) for name, _ in hf_tensors(folder))
    for name, data, ggml_type in tqdm(gguf_tensors(folder, config, file_type), total=count, desc=desc, unit="tensor"):
        writer.add_tensor(name, data, raw_dtype=ggml_type)


def write_export(folder, out, file_type, overwrite):
    import gguf

    if file_type not in FILE_TYPES:
        raise ExportError(f"--type {file_type!r}: not one of {', '.join(FILE_TYPES)}")
    modelfile = out.parent / "Modelfile"
    check_outputs((out, modelfile), overwrite)
    config = read_config(folder)
    style = prompt_style_for(folder)
    template = chat_template_for(style)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with removed_unless_finished(tmp):  # an error, Ctrl-C or SIGTERM: no temporary file stays
        # use_temp_file: tensors spill to disk as they are converted, not all held in memory until the end.
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], use_temp_file=True)
        set_gguf_parameters(writer, config, style, file_type)
        tokenizer = add_tokenizer(writer, folder, config.vocab_size, template)
        add_tensors(writer, folder, config, file_type, desc=f"{folder.name} -> {out.name} ({file_type})")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    try:
        write_atomic(modelfile, modelfile_text(out.name, style, tokenizer.eos_token, folder))
    except OSError as e:
        out.unlink(missing_ok=True)  # both or neither
        raise ExportError(file_system_error(e, modelfile)) from None
    if tokenizer.chat_template != template:
        print(f"note: {folder}'s own chat template is not chat.py's {style} prompt; the GGUF has chat.py's "
              f"(python prepare.py chat-template {folder} fixes the folder)")
    return {"out": out, "modelfile": modelfile, "style": style, "bytes": out.stat().st_size}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a model folder: pretrained, models/SmolLM2-135M-Instruct, ...")
    parser.add_argument("--out", required=True, help="the GGUF file to write (a Modelfile is written beside it)")
    parser.add_argument("--type", default="f16", choices=FILE_TYPES, help="weight type (norms stay f32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output and Modelfile")
    args = parser.parse_args(argv)
    try:
        result = export(args.model_dir, args.out, args.type, args.overwrite)
    except (ExportError, ModelLoadError) as e:
        fail(str(e))
    print(f"wrote {result['out']} ({result['bytes'] / 1e6:.0f} MB, {args.type}, {result['style']} prompt) and "
          f"{result['modelfile']}")


if __name__ == "__main__":
    main()
