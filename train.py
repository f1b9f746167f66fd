"""ChatDoctor supervised fine-tuning: the Alpaca recipe with HF Trainer, loss only on the response.

One process (CPU or one GPU):
    python train.py --model_name_or_path models/SmolLM2-135M-Instruct --data_path alpaca_data.json --output_dir models/stage1
The paper's command on a GPU node (runs verbatim; legacy flags are mapped, see LEGACY_FLAGS):
    torchrun --nproc_per_node=4 --master_port=29500 train.py --model_name_or_path <llama> \
        --data_path ./HealthCareMagic-200k.json --bf16 True --output_dir pretrained --num_train_epochs 3 \
        --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 8 \
        --evaluation_strategy "no" --save_strategy "steps" --save_steps 2000 --save_total_limit 1 \
        --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type "cosine" \
        --logging_steps 1 --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap 'LLaMADecoderLayer' --tf32 True
The two stages of the paper are two runs: Alpaca data first, then the medical conversations from the
stage-1 output (`make recipe`). `--data_path` takes one or more comma-separated files.
LoRA instead of full fine-tuning: `--lora_r 8` (`make demo LORA=1`); QLoRA on one GPU adds `--load_in_4bit True`
(`make recipe LORA=1 QLORA=1 NGPUS=1`). README, "LoRA / QLoRA".
On two nodes (the same command on each; node 0 hosts torchrun's c10d rendezvous at MASTER_ADDR:PORT; output_dir
on a filesystem both mount), or `make recipe NNODES=2 NODE_RANK=0|1 MASTER_ADDR=... MASTER_PORT=...`:
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 \
        --rdzv_id chatdoctor --rdzv_conf is_host=1 train.py ...   # is_host=0 on node 1. README, "Multi-node".
"""
import contextlib
import difflib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # batched tokenization is parallel in Rust

import torch
import transformers
from transformers import HfArgumentParser

import checkpoints
import machine
import prompts
import utils
from checkpoints import AtomicCheckpointTrainer, OutputDirError
from utils import DataError, ModelLoadError, logger


TRAINED_PROMPT_STYLE = "alpaca"  # build_prompt's template: recorded in the saved model for chat.py and eval.py


class ArgumentsError(ValueError):
    """A bad command line: unknown flag, bad value, or settings that cannot train."""


MIN_MODEL_MAX_LENGTH = 16  # cheap floor checked with the flags; the exact one needs the tokenizer
# LoRA's default targets: every projection of attention and MLP (LLaMA: q/k/v/o, gate/up/down), as QLoRA found
# adapting all of them is needed to match full fine-tuning; only the ones the model has are used.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITSANDBYTES_VERSION = "0.50.2"  # what README's QLoRA install line names (GPU-only, not in requirements.txt)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="models/SmolLM2-135M-Instruct")
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the model (off: safer)."})


@dataclass
class DataArguments:
    data_path: str = field(default="data/genmedgpt_train.json", metadata={"help": "File(s), comma-separated."})
    eval_data_path: Optional[str] = field(default=None, metadata={
        "help": "Held-out file(s) for --eval_strategy / --load_best_model_at_end (eval loss); same formats."})
    cache_dir: str = field(default=".cache/tokenized", metadata={"help": "Where tokenized data is cached."})
    data_order_log: Optional[str] = field(default=None, metadata={
        "help": "Folder: each rank appends to rank-<R>.jsonl one line per batch it trains on, with the optimizer step "
                "and the indices of its training examples. Shows how ranks and nodes split each batch, where a "
                "resumed run went on, and which examples were in a step whose loss spiked."})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=512, metadata={"help": "Sequences are truncated to this many tokens."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "AdamW as one fused kernel (same update)."})
    packing: bool = field(default=False, metadata={"help": "Padding-free batches: examples concatenated in one row."})
    cpu_bf16: str = field(default="auto", metadata={
        "help": "--bf16 without CUDA: auto = CPU autocast only where the CPU has a native bf16 matmul, else fp32; "
                "force = CPU autocast anyway (to measure it)", "choices": ["auto", "force"]})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start afresh instead of resuming."})
    # Flags of the 2023 command that transformers 5 no longer knows; mapped in __post_init__.
    evaluation_strategy: Optional[str] = field(default=None, metadata={"help": "Legacy: --eval_strategy."})
    warmup_ratio: Optional[float] = field(default=None, metadata={"help": "Legacy: --warmup_steps <fraction>."})
    fsdp_transformer_layer_cls_to_wrap: Optional[str] = field(default=None, metadata={"help": "Legacy: wrap class."})
    group_by_length: bool = field(default=False, metadata={"help": "Legacy: --train_sampling_strategy group_by_length."})
    # LoRA / QLoRA (peft): train low-rank adapters on a frozen model. r=8, alpha=16, dropout 0.05 are alpaca-lora's.
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning (the paper); 8 = alpaca-lora."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (the update is alpha/r * BA)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated module names to adapt; default: the attention and MLP projections the model has."})
    merge_lora: bool = field(default=True, metadata={
        "help": "Save the base with the adapter merged in (a plain model) and the adapter in output_dir/adapter; "
                "False: only the adapter, in output_dir."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: the frozen base in 4-bit NF4 (CUDA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "The frozen base in 8-bit (CUDA, bitsandbytes)."})

    def __post_init__(self):
        map_legacy_flags(self)
        adapt_to_hardware(self)
        if self.packing and self.use_cache:  # a KV cache turns off the per-example mask of a packed row
            self.use_cache = False
            logger.info("--packing: use_cache off (packed examples would attend to each other)")
        super().__post_init__()


@dataclass
class Variations:
    """What a benchmark varies beyond the command line (bench/bench_train.py, bench/bench_gpu.py); the recipe
    itself runs with the defaults."""
    attn_implementation: Optional[str] = None  # the attention kernel to load the model with (None: transformers')
    packed_attention: bool = True  # --packing: one causal attention per example; False: the model's own, whole row
    collator: Optional[Callable] = None  # the default collator -> the collator to use (e.g. one that counts tokens)
    callbacks: tuple = ()  # TrainerCallbacks added to the Trainer
    save_final_model: bool = True


def map_legacy_flags(args):
    if args.evaluation_strategy is not None:
        args.eval_strategy = args.evaluation_strategy
        logger.info(f"legacy flag: --evaluation_strategy {args.evaluation_strategy} -> --eval_strategy")
    if args.warmup_ratio is not None:
        args.warmup_steps = args.warmup_ratio  # transformers 5 reads a float below 1 as a ratio
        logger.info(f"legacy flag: --warmup_ratio {args.warmup_ratio} -> --warmup_steps {args.warmup_ratio}")
    if args.group_by_length:
        args.train_sampling_strategy = "group_by_length"
        logger.info("legacy flag: --group_by_length -> --train_sampling_strategy group_by_length")


def adapt_to_hardware(args):
    """The paper's GPU flags on a machine without CUDA or torchrun: change what must change, and say so."""
    distributed = "LOCAL_RANK" in os.environ
    if args.fsdp and not distributed:
        args.fsdp = ""
        logger.info("not launched by torchrun: --fsdp dropped (FSDP shards across processes)")
    if torch.cuda.is_available():
        # SDPA with a padding mask picks cuDNN attention on Hopper, which rebuilds its graph for each new batch
        # shape on the CPU, a large part of every padded step (docs/BENCHMARKS.md, GPU section).
        torch.backends.cuda.enable_cudnn_sdp(False)
        return
    if args.fsdp:
        args.fsdp = ""
        logger.info("no CUDA: --fsdp dropped, DDP runs instead (accelerate runs FSDP only on GPUs)")
    if args.tf32:
        args.tf32 = None
        logger.info("no CUDA: --tf32 dropped (TF32 is an Ampere GPU feature)")
    if not args.use_cpu:
        args.use_cpu = True  # without it, CPU ranks under torchrun silently train unlinked
        logger.info("no CUDA: training on CPU (use_cpu=True)")
    if args.bf16 and args.cpu_bf16 == "auto" and not machine.cpu_has_native_bf16():
        args.bf16 = False  # autocast then falls back to a scalar bf16 matmul, many times slower than fp32
        logger.info("no CUDA: --bf16 dropped, fp32 instead (this CPU has no native bf16 matmul; docs/BENCHMARKS.md)")
    elif args.bf16:
        logger.info("no CUDA: bf16 as CPU autocast (native bf16 matmul)")
    if distributed and args.ddp_backend is None:
        args.ddp_backend = "gloo"
        logger.info("no CUDA: distributed backend gloo")
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False


def resolve_wrap_class(requested, model):
    """FSDP wrap class names that exist in this model. The 2023 name 'LLaMADecoderLayer' (and any
    other spelling of a class the model has) maps to the real class; no request means the model's own."""
    own = list(model._no_split_modules or [])
    if not requested:
        return own
    present = {type(m).__name__ for m in model.modules()}
    by_lower = {name.lower(): name for name in present}
    resolved = []
    for name in requested.replace(",", " ").split():
        if name in present:
            resolved.append(name)
        elif name.lower() in by_lower:
            resolved.append(by_lower[name.lower()])
            logger.info(f"FSDP wrap class {name} -> {by_lower[name.lower()]}")
        else:
            logger.info(f"FSDP wrap class {name} is not in {type(model).__name__}; wrapping {own}")
            return own
    return resolved


def configure_fsdp(args, model):
    if not args.fsdp:
        return
    wrap = resolve_wrap_class(args.fsdp_transformer_layer_cls_to_wrap, model)
    args.fsdp_config["transformer_layer_cls_to_wrap"] = wrap
    if args.fsdp_plugin_args is not None:
        args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = ",".join(wrap)
    if args.lora_r:
        # The Trainer swaps in peft's wrap policy for a PeftModel (each trainable LoRA layer its own unit, beside the
        # decoder layers); it reads the decoder-layer classes from this variable. peft's FSDP guide: FSDP1 with
        # use_orig_params=False saves the memory (FSDP2, transformers' default, always uses the original parameters).
        os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(wrap)
        args.fsdp_config["use_orig_params"] = "false"
        if args.fsdp_plugin_args is not None and "use_orig_params" in args.fsdp_plugin_args:
            args.fsdp_plugin_args["use_orig_params"] = False


def resolve_lora_targets(requested, model):
    """The module names LoRA adapts, checked against the model like the FSDP wrap class: the default is every
    projection in LORA_TARGETS that the model has; a requested name the model lacks is an error."""
    def short_names(modules):  # peft matches a target name against the last part of a module's name
        return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in modules if name))

    present = short_names(model.named_modules())
    if not requested:
        targets = [name for name in LORA_TARGETS if name in present]
        if not targets:
            raise ArgumentsError(f"{type(model).__name__} has none of {', '.join(LORA_TARGETS)}; "
                                 "name the modules to adapt with --lora_target_modules")
        return targets
    targets = requested.replace(",", " ").split()
    missing = [name for name in targets if name not in present]
    if missing:
        linear = short_names((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        raise ArgumentsError(f"--lora_target_modules {', '.join(missing)}: not a module of {type(model).__name__} "
                             f"(its linear layers: {', '.join(linear)})")
    return targets


def quantization_kwargs(args):
    """from_pretrained arguments for QLoRA's frozen base: bitsandbytes NF4 with bf16 compute and double
    quantization (the QLoRA paper), or 8-bit; each process's copy on its own GPU. {} without --load_in_*."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                                bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                bnb_4bit_use_double_quant=True)
    return {"quantization_config": config, "device_map": {"": args.device}}  # this rank's GPU


def apply_lora(model, args, base_model_path):
    """Freeze the model and add trainable low-rank adapters (peft LoRA) to the target projections. A 4/8-bit base
    is prepared first as peft documents (norms in fp32, inputs that carry gradients through checkpointing)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = resolve_lora_targets(args.lora_target_modules, model)
    if args.load_in_4bit or args.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.activation_checkpointing)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    transformers.set_seed(args.seed)  # the adapters start random: the same seed must give the same run
    model = get_peft_model(model, config)
    # What the saved adapter names as its base: the path as given (peft would record the folder of a .gguf file).
    model.peft_config["default"].base_model_name_or_path = str(base_model_path)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {', '.join(targets)}: "
                f"{trainable:,} of {total:,} parameters train ({trainable / total:.2%})")
    return model


def describe_strategy(trainer):
    args = trainer.args
    if trainer.is_fsdp_enabled:
        wrapped = args.fsdp_config.get("transformer_layer_cls_to_wrap")
        return f"FSDP over {args.world_size} GPUs, wrapping {wrapped}{describe_nodes(args)}"
    ddp = f"DDP over {args.world_size} {'GPU' if torch.cuda.is_available() else 'CPU'} processes ({args.ddp_backend or 'nccl'})"
    return ddp + describe_nodes(args) if args.world_size > 1 else f"single process on {args.device}"


def describe_nodes(args):
    """', 2 nodes (this one: global ranks 2-3)' under a multi-node torchrun; '' on one node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
    if per_node >= args.world_size:
        return ""
    first = args.process_index - args.local_process_index
    ranks = f"rank {first}" if per_node == 1 else f"ranks {first}-{first + per_node - 1}"
    writer = ", which writes the output" if first == 0 else "; global rank 0 writes the output"
    return f", {args.world_size // per_node} nodes (this one: global {ranks}{writer})"


def warn_if_alpaca_sample(data_path):
    for path in str(data_path).split(","):
        if utils.is_alpaca_sample(path.strip()):
            logger.warning(f"{path.strip()} is the bundled 999-record Alpaca sample, not the 52k Stanford Alpaca "
                           "the paper's stage 1 used (data/README.md)")


def tokenize(records, data_args, training_args, tokenizer, what="training"):
    with training_args.main_process_first(desc="tokenizing"):  # rank 0 tokenizes; the others read its cache
        examples = utils.tokenize_cached(records, tokenizer, training_args.model_max_length, data_args.cache_dir)
    source = data_args.eval_data_path if what == "evaluation" else data_args.data_path
    logger.info(f"{len(examples)} {what} examples from {source}")
    return examples


def make_collator(training_args, tokenizer):
    if training_args.packing:
        return utils.collate_packed
    return partial(utils.collate_padded, pad_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- data order log

EXAMPLE_INDEX = "example_index"  # batch key carrying the examples' indices to the Trainer (never to the model)


class IndexedExamples(torch.utils.data.Dataset):
    """The training examples, each carrying its index (only with --data_order_log)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return {**self.examples[i], EXAMPLE_INDEX: i}


def collate_with_indices(examples, collate):
    indices = [e[EXAMPLE_INDEX] for e in examples]
    batch = collate([{k: v for k, v in e.items() if k != EXAMPLE_INDEX} for e in examples])
    batch[EXAMPLE_INDEX] = torch.tensor(indices)
    return batch


class ChatDoctorTrainer(AtomicCheckpointTrainer):
    """The Trainer train.py runs: atomic checkpoints (checkpoints.py) and, with --data_order_log, one line per batch
    naming the examples this rank trains on. The line is written where the batch is trained (training_step), not
    where it is loaded: the data loader reads ahead, and a resumed run skips batches without loading them."""

    def __init__(self, *args, data_order_log=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_order_path = Path(data_order_log) / f"rank-{self.args.process_index}.jsonl" if data_order_log else None
        self.run_started = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # tells a resumed run's lines from the killed one's

    def training_step(self, model, inputs, num_items_in_batch=None):
        indices = inputs.pop(EXAMPLE_INDEX, None)
        if indices is not None and self.data_order_path:
            self.data_order_path.parent.mkdir(parents=True, exist_ok=True)
            line = {"step": self.state.global_step + 1, "rank": self.args.process_index, "examples": indices.tolist(),
                    "run_started": self.run_started}
            with open(self.data_order_path, "a") as f:  # whole lines, flushed: a killed run leaves what it trained
                f.write(json.dumps(line) + "\n")
        return super().training_step(model, inputs, num_items_in_batch)


def claim_output_dir(args, fingerprint):
    """Refuse another run's output_dir; return the checkpoint to resume from (None: start afresh).
    Re-running a killed command continues from its latest complete checkpoint."""
    checkpoints.check_output_dir(args.output_dir, fingerprint, overwrite=args.overwrite_output_dir)
    if args.resume_from_checkpoint:
        checkpoints.check_explicit_checkpoint(args.resume_from_checkpoint)
        resume = args.resume_from_checkpoint
    elif not args.overwrite_output_dir:
        resume = checkpoints.find_resume_checkpoint(args.output_dir, fingerprint)
    else:
        resume = None
    if args.should_save:
        os.makedirs(args.output_dir, exist_ok=True)
        checkpoints.write_fingerprint(args.output_dir, fingerprint)
    if args.world_size > 1:
        check_ranks_share_output_dir(args, fingerprint, resume)
    if resume:
        logger.info(f"resuming from {resume}")
    return resume


@contextlib.contextmanager
def claimed_output_dir(args, fingerprint):
    """claim_output_dir for the block that prepares training (tokenize, load the model): should it fail (weights
    that cannot be loaded, Ctrl-C), what the claim wrote goes again, so a failed start leaves no output folder."""
    folder = Path(args.output_dir)
    existed, had_run_file = folder.exists(), (folder / checkpoints.RUN_FILE).exists()
    resume = claim_output_dir(args, fingerprint)
    try:
        yield resume
    except BaseException:
        if args.should_save and not had_run_file:
            (folder / checkpoints.RUN_FILE).unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty: nothing but what the claim wrote
        raise


def check_ranks_share_output_dir(args, fingerprint, resume):
    """Every rank must resume from the same checkpoint. Global rank 0 alone writes checkpoints (other ranks add
    their RNG state) and the final model; a node that does not mount output_dir would start afresh while the
    others resume from a checkpoint, with other step counts and optimizer state. Refused here, before training;
    an output_dir that other nodes cannot see at the start is a warning (the run trains, but cannot resume)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    PartialState().wait_for_everyone()  # rank 0 has written output_dir/run.json
    seen = checkpoints.read_fingerprint(args.output_dir) or {}
    views = gather_object([{"rank": args.process_index, "host": socket.gethostname(), "resume": resume,
                            "sees_output_dir": seen.get("digest") == fingerprint["digest"]}])
    where = "; ".join(f"rank {v['rank']} on {v['host']}: {Path(v['resume']).name if v['resume'] else 'none'}"
                      for v in views)
    if len({v["resume"] for v in views}) > 1:
        raise OutputDirError(f"--output_dir {args.output_dir}: the ranks found different checkpoints to resume from "
                             f"({where}); a multi-node run needs output_dir on a filesystem that every node mounts "
                             "at the same path (README, Multi-node)")
    blind = [f"rank {v['rank']} on {v['host']}" for v in views if not v["sees_output_dir"]]
    if blind and args.process_index == 0:
        logger.warning(f"--output_dir {args.output_dir} is not shared with {', '.join(blind)}: the model is written on "
                       f"{socket.gethostname()} (global rank 0), but its checkpoints lack the other ranks' state and "
                       "a resume will be refused; mount output_dir on every node (README, Multi-node)")


def save_final_model(trainer, tokenizer, output_dir, trust_remote_code=False):
    """Full state dict (gathered under FSDP) as safetensors, plus tokenizer and generation config, so
    plain AutoModelForCausalLM.from_pretrained loads it and generate() stops at the trained EOS.
    A LoRA run saves its adapter (peft format) and, with --merge_lora (the default), the merged model beside it:
    the adapter in output_dir/adapter, the plain model in output_dir. With --merge_lora False output_dir is the
    adapter, which chat.py and eval.py load onto its base model.
    Everything is written to output_dir/tmp-final first and moved in once whole."""
    model = trainer.model
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    staging = Path(output_dir) / f"{checkpoints.STAGING_PREFIX}final"
    merge = trainer.args.lora_r > 0 and trainer.args.merge_lora
    saved = staging / checkpoints.ADAPTER_DIR if merge else staging
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that failed
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(saved))  # the full model, or (LoRA) the adapter alone
    if trainer.is_world_process_zero():
        # Serving engines (vLLM, TGI, llama.cpp) prompt with the tokenizer's chat template: make it the prompt
        # the model trained on, not the base model's.
        tokenizer.chat_template = prompts.chat_template_for(TRAINED_PROMPT_STYLE)
        for folder in dict.fromkeys((staging, saved)):  # a LoRA adapter folder loads on its own too
            tokenizer.save_pretrained(folder)  # (it may hold the pad token ensure_pad_token added)
            utils.write_json_atomic(folder / utils.PROMPT_STYLE_FILE, {"prompt_style": TRAINED_PROMPT_STYLE})
            # The final folder holds no pickles: the arguments go in as JSON instead of training_args.bin.
            (folder / "training_args.bin").unlink(missing_ok=True)
        if trainer.args.lora_r:
            model.generation_config.save_pretrained(saved)  # peft saves none: the trained EOS would be lost
        if merge:
            save_merged_model(saved, staging, trust_remote_code)
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        (staging / "training_args.json").write_text(trainer.args.to_json_string())
        checkpoints.write_fingerprint(staging, trainer.fingerprint)
        checkpoints.publish_files(staging, output_dir)
        draw_loss_plot(trainer.state.log_history, Path(output_dir) / "loss.png")


def save_merged_model(adapter_dir, out_dir, trust_remote_code=False):
    """The base model with the saved adapter merged into its weights, as a plain model. Read afresh in fp32 on the
    CPU because peft cannot merge under FSDP, and merging into a 4-bit base would round the update away; the
    same loading chat.py and eval.py do for an adapter folder (utils.load_model)."""
    merged = utils.load_model(adapter_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged.config.use_cache = True
    merged.save_pretrained(out_dir)
    logger.info(f"LoRA adapter merged into {utils.adapter_base_model(adapter_dir)}")


def draw_loss_plot(log_history, png_path):
    """The loss curve beside the published model. Drawn after publishing: a plotting failure is a warning,
    never a model left unpublished (a stale plot of an older model is removed)."""
    import plot_loss

    try:
        plot_loss.save_loss_plot(log_history, png_path)
    except Exception as e:  # noqa: BLE001 - fonts, backend, disk: none of them may cost the trained model
        Path(png_path).unlink(missing_ok=True)
        logger.warning(f"loss plot not written ({utils.first_line(e)}); the model in {Path(png_path).parent} "
                       "is complete (python plot_loss.py can draw it from trainer_state.json)")


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    """The three argument dataclasses, checked. Every problem is one ArgumentsError line."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.error = _argparse_error  # argparse would print a page of usage first
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ArgumentsError:
        raise
    except ValueError as e:  # TrainingArguments' own checks (e.g. --bf16 on a CPU that lacks it)
        raise ArgumentsError(utils.first_line(e)) from None
    if unknown:
        raise ArgumentsError(unknown_flags_message(unknown, known_flags()))
    check_args(*parsed)
    return parsed


def known_flags():
    """Every flag parse_args accepts, from the dataclasses' fields (argparse has no public list of its options)."""
    return [f"--{f.name}" for cls in (ModelArguments, DataArguments, TrainingArguments) for f in fields(cls)]


def _argparse_error(message):
    raise ArgumentsError(message)


def unknown_flags_message(unknown, known):
    flags = [a for a in unknown if a.startswith("-")] or unknown
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
        hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    return "unknown flag" + ("s" if len(hints) > 1 else "") + ": " + ", ".join(hints)


def check_args(model_args, data_args, args):
    """Settings that cannot train, caught before any data or model is read."""
    problems = []
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        problems.append(f"--learning_rate must be > 0, got {args.learning_rate}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.model_max_length < MIN_MODEL_MAX_LENGTH:
        problems.append(f"--model_max_length {args.model_max_length} is too short: the prompt template alone "
                        f"needs more than {MIN_MODEL_MAX_LENGTH} tokens")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        problems.append(f"--num_train_epochs must be > 0 (or --max_steps set), got {args.num_train_epochs}")
    if args.warmup_steps < 0 or args.weight_decay < 0:
        problems.append("--warmup_steps and --weight_decay must be >= 0")
    if args.eval_strategy != "no" and not data_args.eval_data_path:
        problems.append(f"--eval_strategy {args.eval_strategy.value} needs held-out data: pass --eval_data_path")
    problems += lora_problems(args)
    if problems:
        raise ArgumentsError("; ".join(problems))


def lora_problems(args):
    """LoRA / QLoRA settings that cannot train. QLoRA needs CUDA and bitsandbytes: checked here, before any data
    is read, rather than when the model loads."""
    if args.lora_r < 0:
        return [f"--lora_r must be >= 0 (0: full fine-tuning), got {args.lora_r}"]
    problems = []
    if args.lora_r > 0 and args.lora_alpha <= 0:
        problems.append(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if args.lora_r > 0 and not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    flag = "--load_in_4bit" if args.load_in_4bit else "--load_in_8bit" if args.load_in_8bit else None
    if args.load_in_4bit and args.load_in_8bit:
        problems.append("--load_in_4bit and --load_in_8bit: choose one")
    elif flag and args.lora_r <= 0:
        problems.append(f"{flag} trains LoRA adapters on a frozen quantized model (QLoRA): add --lora_r 8")
    elif flag and (args.use_cpu or not torch.cuda.is_available()):
        problems.append(f"{flag} needs a CUDA GPU (bitsandbytes); this run is on the CPU")
    elif flag and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"{flag} needs bitsandbytes: pip install bitsandbytes=={BITSANDBYTES_VERSION}")
    elif flag and args.fsdp:
        problems.append(f"{flag} with --fsdp: QLoRA here runs on one GPU or under DDP; drop --fsdp")
    return problems


def check_prompt_fits(tokenizer, max_length):
    """The shortest possible prompt plus one response token must fit in model_max_length."""
    empty_prompt = prompts.build_prompt({"instruction": "", "input": "", "output": ""})
    needed = len(tokenizer(empty_prompt)["input_ids"]) + 2  # + one response token + EOS
    if max_length < needed:
        raise ArgumentsError(f"--model_max_length {max_length} is too short: the prompt template alone takes "
                             f"{needed - 2} tokens; use at least {needed} (the paper uses 512)")


def train(argv=None, variations=Variations()):
    model_args, data_args, training_args = parse_args(argv)

    utils.check_model_path(model_args.model_name_or_path)
    records = utils.load_data(data_args.data_path)  # every record checked before anything expensive
    eval_records = utils.load_data(data_args.eval_data_path) if data_args.eval_data_path else None
    if training_args.process_index == 0:
        warn_if_alpaca_sample(data_args.data_path)
    tokenizer = utils.load_tokenizer(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code,
        model_max_length=training_args.model_max_length, padding_side="right",
    )
    check_prompt_fits(tokenizer, training_args.model_max_length)
    fingerprint = checkpoints.run_fingerprint(model_args.model_name_or_path, records, training_args)
    with claimed_output_dir(training_args, fingerprint) as resume:  # refuses another run's folder; finds our checkpoint
        train_dataset = tokenize(records, data_args, training_args, tokenizer)
        eval_dataset = (tokenize(eval_records, data_args, training_args, tokenizer, "evaluation") if eval_records
                        else None)
        # fp32 master weights as in the paper; --bf16 is mixed precision (autocast / FSDP mixed precision)
        model = utils.load_model(
            model_args.model_name_or_path, dtype=torch.float32, trust_remote_code=model_args.trust_remote_code,
            **quantization_kwargs(training_args),
            **({"attn_implementation": variations.attn_implementation} if variations.attn_implementation else {}),
        )
    utils.ensure_pad_token(tokenizer, model)
    if training_args.packing and variations.packed_attention:
        logger.info(f"--packing: attention {utils.use_packed_attention(model)} (one causal attention per example)")
    if training_args.lora_r:
        model = apply_lora(model, training_args, model_args.model_name_or_path)
    configure_fsdp(training_args, model)

    collator = make_collator(training_args, tokenizer)
    if variations.collator:
        collator = variations.collator(collator)
    if data_args.data_order_log:
        train_dataset, collator = IndexedExamples(train_dataset), partial(collate_with_indices, collate=collator)
        # The Trainer would drop the index before the collator (not a model input); the examples hold nothing else
        # it could drop (input_ids, labels), so turning the removal off changes nothing else.
        training_args.remove_unused_columns = False
    trainer = ChatDoctorTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=collator, processing_class=tokenizer, fingerprint=fingerprint,
        callbacks=list(variations.callbacks) or None, data_order_log=data_args.data_order_log,
    )
    logger.info(f"strategy: {describe_strategy(trainer)}")
    trainer.train(resume_from_checkpoint=resume)
    if variations.save_final_model:
        save_final_model(trainer, tokenizer, training_args.output_dir, model_args.trust_remote_code)
    # No rank returns before the model is published: the next command on any node (stage 2) may read it.
    trainer.accelerator.wait_for_everyone()
    if variations.save_final_model and trainer.is_world_process_zero():
        logger.info(f"saved {training_args.output_dir}")
    return trainer


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        logger.setLevel(logging.WARNING)
    try:
        return train(argv)
    except (ArgumentsError, DataError, ModelLoadError, OutputDirError) as e:
        utils.fail(str(e))
    except OSError as e:
        if e.errno not in checkpoints.DISK_FULL:
            raise
        utils.fail(f"disk full while writing {e.filename or 'output'}: no checkpoint was left half-written; "
                   "free space and re-run the same command to resume from the last complete checkpoint")
    except RuntimeError as e:
        if not lost_another_rank(e):
            raise
        utils.fail(f"lost contact with another rank ({peer_error_summary(e)}): a node or process died or the network "
                   "failed; re-run the same command on every node to resume from the last complete checkpoint")


# What a collective raises when a peer is gone: torch's DistError family (NCCL, the TCP store, timeouts) and gloo's
# plain RuntimeError ("Connection closed by peer" was measured with one of two loopback nodes killed).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_another_rank(error):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return isinstance(error, torch.distributed.DistError) or any(text in str(error) for text in PEER_LOST)


def peer_error_summary(error):
    """'Read error [10.0.0.2]:31395: Connection reset by peer' from gloo's '[/path/pair.cc:537] Read error ...
    by peer. This is typically caused by ...'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", utils.first_line(error))
    return text.split(". ")[0][:200]


if __name__ == "__main__":
    main()
