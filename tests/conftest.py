"""Shared fixtures: a tiny random LLaMA (fast tests) and the embedded default SmolLM2 (where text matters)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

EMBEDDED_MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The embedded default as HF safetensors (`make model`); made on first use if missing."""
    if not (EMBEDDED_MODEL_DIR / "model.safetensors").is_file():
        import prepare

        prepare.make_model(EMBEDDED_MODEL_DIR)
    return EMBEDDED_MODEL_DIR


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def make_tiny_llama(out_dir, tokenizer, seed=0, layers=2, hidden=32):
    """A randomly initialised LlamaForCausalLM with the real tokenizer, saved as a normal HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)
