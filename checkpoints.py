"""Checkpoints that are whole or absent, resuming from the latest whole one, and whose run a folder holds.

- Every checkpoint is written under `tmp-checkpoint-N/`, flushed to disk and only then renamed to
  `checkpoint-N/`: a kill, a power cut or a full disk during a save leaves no `checkpoint-N` that looks
  complete, and the previous one is untouched. The final model is staged in `tmp-final/` the same way.
- `run.json` (the run's fingerprint: data, base model, hyperparameters) is written into `output_dir` when
  a run starts and into each checkpoint. A re-run with the same command resumes; an `output_dir` that holds
  another run's model or checkpoints is refused unless `--overwrite_output_dir`.
"""
import errno
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from utils import logger, write_atomic

RUN_FILE = "run.json"
STAGING_PREFIX = "tmp-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What makes two runs the same run: data, base model and these settings (not paths, logging or saving).
DEFINING_ARGS = (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
    "optim_args", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "seed", "data_seed", "model_max_length",
    "packing", "bf16", "fp16", "train_sampling_strategy",
)
# A LoRA run (--lora_r > 0) is also defined by these; a full fine-tuning run's fingerprint is as it always was.
LORA_ARGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit", "load_in_8bit")
# What a finished model in output_dir consists of: a newer model that lacks one of these replaces the old one's.
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "config.json", "adapter_config.json")
ADAPTER_DIR = "adapter"  # a merged LoRA model's adapter, beside it
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputDirError(ValueError):
    """An output_dir or checkpoint that this run must not use; the message says why and what to do."""


# ----------------------------------------------------------------------------- fingerprint

def run_fingerprint(model_path, records, training_args):
    """What identifies a run. A base model made by train.py contributes its own fingerprint, so stage 2
    of the recipe knows when stage 1 changed; any other local model contributes its config.json."""
    model = Path(model_path).expanduser()
    model_id = {"path": str(model.resolve()) if model.exists() else str(model_path)}
    base_run = read_fingerprint(model) if model.is_dir() else None
    if base_run:
        model_id["run"] = base_run["digest"]
    elif (model / "config.json").is_file():
        model_id["config_sha256"] = hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
    data = hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()
    defining = DEFINING_ARGS + (LORA_ARGS if getattr(training_args, "lora_r", 0) > 0 else ())
    hyper = {name: _jsonable(getattr(training_args, name, None)) for name in defining}
    body = {"data_sha256": data, "n_records": len(records), "model": model_id, "hyperparameters": hyper}
    body["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body


def _jsonable(value):
    return value if isinstance(value, (str, int, float, bool, type(None), dict, list)) else str(value)


def read_fingerprint(folder):
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def describe_difference(old, new):
    """'data', 'model' and the changed hyperparameters, for the refusal message."""
    if old is None:
        return "it has no run.json, so it was not made by this command"
    changes = []
    if old.get("data_sha256") != new["data_sha256"]:
        changes.append("other data")
    if old.get("model") != new["model"]:
        changes.append(f"other base model ({old.get('model', {}).get('path')})")
    old_hyper = old.get("hyperparameters", {})
    changes += [f"{k} {old_hyper.get(k)!r} -> {v!r}" for k, v in new["hyperparameters"].items() if old_hyper.get(k) != v]
    return "it is from a different run: " + ", ".join(changes or ["other settings"])


def write_fingerprint(folder, fingerprint):
    write_atomic(Path(folder) / RUN_FILE, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def check_output_dir(output_dir, fingerprint, overwrite):
    """Refuse an output_dir holding another run's finished model or checkpoints (unless overwrite)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output_dir {out}: exists and is not a directory")
    if not out.exists():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            raise OutputDirError(f"--output_dir {out}: cannot create it, {parent} is not a writable directory")
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output_dir {out}: not writable")
    if overwrite:
        return
    holds_model = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    holds_checkpoints = bool(checkpoint_folders(out))
    if not (holds_model or holds_checkpoints):
        return
    old = read_fingerprint(out)
    if old is not None and old.get("digest") == fingerprint["digest"]:
        return
    what = "a finished model" if holds_model else "checkpoints"
    raise OutputDirError(
        f"--output_dir {out} holds {what} and {describe_difference(old, fingerprint)}; "
        "pass --overwrite_output_dir to train afresh there, or choose another --output_dir"
    )


# ----------------------------------------------------------------------------- completeness and resume

def checkpoint_folders(output_dir):
    """checkpoint-N folders, newest (highest N) first."""
    found = []
    for entry in Path(output_dir).iterdir():
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_problem(folder):
    """Why a checkpoint folder cannot be resumed from, or None when it is complete."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json missing or unreadable"
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("pytorch_model_fsdp*"))
    if not weights:
        return "no model weights"
    for path in folder.glob("*.safetensors"):
        if not safetensors_whole(path):
            return f"{path.name} is truncated"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return "model.safetensors.index.json unreadable"
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            return f"missing weight shard {missing[0]}"
    if not any(folder.glob("optimizer*")) or not (folder / "scheduler.pt").is_file():
        return "no optimizer or scheduler state"
    return None


def safetensors_whole(path):
    """A safetensors file whose header parses and whose tensors end exactly at the end of the file."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
        return 8 + header_len + max(ends, default=0) == os.path.getsize(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def find_resume_checkpoint(output_dir, fingerprint):
    """The newest complete checkpoint of this run in output_dir, or None. Incomplete checkpoints,
    interrupted saves and other runs' checkpoints are skipped with a warning."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    for staging in sorted(out.glob(f"{STAGING_PREFIX}*")):
        logger.warning(f"skipping {staging}: a save that was interrupted (incomplete, ignored)")
    for folder in checkpoint_folders(out):
        problem = checkpoint_problem(folder)
        if problem:
            logger.warning(f"skipping incomplete checkpoint {folder}: {problem}")
            continue
        old = read_fingerprint(folder)
        if old is None or old.get("digest") != fingerprint["digest"]:
            logger.warning(f"skipping checkpoint {folder}: {describe_difference(old, fingerprint)}")
            continue
        return str(folder)
    return None


def check_explicit_checkpoint(path):
    if not Path(path).is_dir():
        raise OutputDirError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
    problem = checkpoint_problem(path)
    if problem:
        raise OutputDirError(f"--resume_from_checkpoint {path}: incomplete checkpoint ({problem})")


# ----------------------------------------------------------------------------- atomic writes

def _fsync_tree(folder):
    """Flush every file and folder under `folder` to disk, so a rename after it publishes whole files."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def publish_folder(staged, final):
    """Rename a fully written folder into place; an older folder of the same name is replaced."""
    staged, final = Path(staged), Path(final)
    _fsync_tree(staged)
    if final.exists():  # re-saving a step (e.g. after resuming from it): swap, then drop the old one
        old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)


def publish_files(staged, final_dir):
    """Move a fully written final model from `staged` into `final_dir`, file by file (each rename is
    atomic; a folder such as adapter/ is swapped whole), after removing the files of an older model that
    the new one does not have (a full model after a LoRA adapter, or the other way round)."""
    staged, final_dir = Path(staged), Path(final_dir)
    _fsync_tree(staged)
    new = {p.name for p in staged.iterdir()}
    for pattern in MODEL_FILES:
        for old in final_dir.glob(pattern):
            if old.name not in new and old.is_file():
                old.unlink()
    if ADAPTER_DIR not in new:
        shutil.rmtree(final_dir / ADAPTER_DIR, ignore_errors=True)
    for name in sorted(new - {RUN_FILE}) + ([RUN_FILE] if RUN_FILE in new else []):
        if (staged / name).is_dir():
            publish_folder(staged / name, final_dir / name)
        else:
            os.replace(staged / name, final_dir / name)
    shutil.rmtree(staged, ignore_errors=True)
    _fsync_dir(final_dir)


class AtomicCheckpointTrainer(Trainer):
    """A Trainer whose checkpoints appear whole or not at all, each carrying the run's fingerprint.

    The stock `_save_checkpoint` writes into `_get_output_dir()`; during a save that points at a staging
    folder, and the finished checkpoint is renamed into `output_dir` afterwards. Both are private Trainer
    methods, overridden because no public hook can choose where a checkpoint is written (docs/PRIVATE_API.md)."""

    def __init__(self, *args, fingerprint=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fingerprint = fingerprint
        self._staging = None

    def _get_output_dir(self, trial):
        return self._staging or super()._get_output_dir(trial)

    def _record_best_as_published(self, run_dir, staged):
        """The stock save names the best checkpoint under `_get_output_dir()`, the staging folder here: a path
        that is gone once the checkpoint is published, or (for an older best) never there. Point it at
        run_dir/checkpoint-<best step>, in the state and in the staged trainer_state.json, so that
        --load_best_model_at_end, --save_total_limit rotation and a resume all find the best checkpoint."""
        best_step = self.state.best_global_step
        if not best_step:
            return
        best = os.path.join(run_dir, f"checkpoint-{best_step}")
        if best_step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # e.g. disk full: free the space, keep older checkpoints
            raise
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        self._record_best_as_published(run_dir, os.path.join(staging, name))
        if self.args.should_save:
            if self.fingerprint:
                write_fingerprint(os.path.join(staging, name), self.fingerprint)
            publish_folder(os.path.join(staging, name), os.path.join(run_dir, name))
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:  # a node that does not share output_dir keeps its RNG state in a stray folder
            shutil.rmtree(staging, ignore_errors=True)
