"""What train.py, chat.py and eval.py share: data readers, tokenization, model loading (the prompt is prompts.py's).

Every reader raises DataError (bad data) or ModelLoadError (bad model folder) with a one-line message
naming the file, the record and the field; the scripts print it and exit non-zero, with no traceback.
"""
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prompts import CHATDOCTOR_INSTRUCTION, DEFAULT_PROMPT_STYLE, PROMPT_DICT, PROMPT_STYLES, build_prompt

logger = logging.getLogger("chatdoctor")

IGNORE_INDEX = -100
# train.py writes this file into the model it saves: how the model was trained to be prompted, so that
# chat.py and eval.py prompt it the same way (a model from elsewhere has none).
PROMPT_STYLE_FILE = "chatdoctor.json"
# The data the repository carries (data/README.md: sources, record counts, sha256, licences).
ROOT = Path(__file__).resolve().parent
GENMEDGPT_PATH = ROOT / "data" / "chatdoctor5k.json"
ALPACA_SAMPLE_PATH = ROOT / "alpaca_data.json"
DISEASE_DB_PATH = ROOT / "format_dataset.csv"
BUNDLED_SHA256 = {
    GENMEDGPT_PATH: "780c1a6aa67d461359ac220c120134429290b1e340545c3ad8954e1aa235d80f",
    ALPACA_SAMPLE_PATH: "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
    DISEASE_DB_PATH: "d1fdcdd2c20fb80e446af788aef92d470595aa51c88743af71ce8c0f2a5b9e4b",
}
ALPACA_SAMPLE_BYTES = 859_893  # a cheap first test before hashing a user's (maybe 20 MB) stage-1 file


class DataError(ValueError):
    """Bad training/eval data: the message names the file, the record and the field."""


class ModelLoadError(ValueError):
    """A model path that cannot be loaded: the message names the path and what is wrong."""


def fail(message, code=2):
    """The scripts' way out on bad input: one line on stderr, a non-zero exit, no traceback."""
    print(f"error: {terminal_safe(message, one_line=True)}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------- data readers

def relative(path):
    """A path under the repository as the reader's checkout names it; any other path as it is."""
    text = str(path)
    return text[len(str(ROOT)) + 1:] if text.startswith(str(ROOT) + os.sep) else text


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data):
    """Write text or bytes so that readers see the old file or the whole new one, never a part (also after
    a crash: the data is on disk before the rename). The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and host: writers on several nodes of a shared filesystem (the tokenized cache) never share a temp file
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{socket.gethostname()}")
    with removed_unless_finished(tmp):
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def write_json_atomic(path, obj):
    return write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while a file was being written (exit status 128 + the signal, no traceback)."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


def _remove(path):
    path = Path(path)
    with contextlib.suppress(OSError):  # the first error is what the user must see, not a failed clean-up
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def removed_unless_finished(path):
    """Delete the temporary file or folder `path` when the block does not finish: an error, Ctrl-C, or (in the main
    thread) SIGTERM or SIGHUP, which are turned into Terminated for the time of the block so that it unwinds."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) == signal.SIG_DFL:  # a program that handles them itself keeps its handler
                handlers[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield Path(path)
    except BaseException:
        _remove(path)
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder, pattern):
    """Delete what a killed writer (SIGKILL, power loss) left: entries of `folder` matching `pattern`, a regular
    expression whose group 'pid' is the writer's process id, whose process no longer runs."""
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            match = re.fullmatch(pattern, entry.name)
            if match and int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"])):
                _remove(entry)


# ESC [ ... (CSI), ESC ] ... BEL / ESC \\ (OSC: window title, hyperlinks, clipboard), ESC P / X / ^ / _ strings,
# other ESC sequences, and their 8-bit forms (0x9b CSI, 0x9d OSC, 0x90 DCS ...).
_TERMINAL_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?|\x9b[0-?]*[ -/]*[@-~]?"
    r"|[\x1b][\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?|[\x9d\x90\x98\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
# What remains that a terminal acts on: C0 controls but tab and newline, DEL, C1 controls, and the bidirectional
# overrides and isolates that make text display in another order than it reads (U+202A-U+202E, U+2066-U+2069).
_CONTROL_CHARACTER = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def terminal_safe(text, one_line=False):
    """Untrusted text (a knowledge title, a file name, a model's answer) as it may be written to a terminal: escape
    sequences and control characters removed, lone surrogates (which no terminal encoding can take) as U+FFFD;
    `one_line`: newlines and tabs become spaces too. Everything that prints such text goes through here."""
    text = _CONTROL_CHARACTER.sub("", _TERMINAL_SEQUENCE.sub("", str(text)))
    text = _LONE_SURROGATE.sub("\ufffd", text)
    return re.sub(r"[\n\t]", " ", text) if one_line else text


def _heading_level(line):
    hashes = len(line) - len(line.lstrip("#"))
    return hashes if 0 < hashes <= 6 and line[hashes:hashes + 1] == " " else 0


def replace_markdown_section(path, text, begin, end, heading=None, new_at_start=False):
    """Put `text` between the marker lines `begin` and `end` (HTML comments) of the markdown file `path`, keeping
    everything outside them as it is; the file is replaced atomically. The one way generated text enters a
    document (eval.py's RESULTS.md block, bench/run.py's and bench/bench_chat.py's BENCHMARKS.md sections).

    Without the markers: the section under the line `heading` (up to the next heading of its level or higher)
    is replaced by the heading and the marked text; without that heading either, heading and marked text are
    added at the end (or, with `new_at_start`, at the start) of the file, which is created if missing."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    lines = old.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(begin)), None)
    stop = next((i for i, line in enumerate(lines) if start is not None and i > start and line.startswith(end)), None)
    if stop is not None:
        new_lines = lines[:start] + [block] + lines[stop + 1:]
    else:
        section = [heading, "", block] if heading else [block]
        at = next((i for i, line in enumerate(lines) if heading and line.rstrip() == heading), None)
        if at is not None:
            level = _heading_level(heading)
            after = next((j for j in range(at + 1, len(lines)) if 0 < _heading_level(lines[j]) <= level), len(lines))
            new_lines = lines[:at] + section + ([""] if after < len(lines) else []) + lines[after:]
        elif new_at_start:
            new_lines = section + ([""] + lines if lines else [])
        else:
            while lines and not lines[-1].strip():
                lines.pop()
            new_lines = lines + ([""] if lines else []) + section
    return write_atomic(path, "\n".join(new_lines) + "\n")


def is_alpaca_sample(path):
    """True for the bundled 999-record Alpaca sample (by content, wherever it lies)."""
    path = Path(path)
    return path.is_file() and path.stat().st_size == ALPACA_SAMPLE_BYTES and \
        sha256_of(path) == BUNDLED_SHA256[ALPACA_SAMPLE_PATH]


def display_path(path):
    """A path as text that always prints and encodes: the bytes of a file name that is not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def check_utf8_name(path):
    """A DataError naming `path` when its name is not UTF-8 (it could not be hashed, cited or written to JSON)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{display_path(path)}: file name is not valid UTF-8; rename the file") from None


def _file_kind(mode):
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _check_regular(path, st, max_bytes):
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{display_path(path)}: is a directory, expected a data file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{display_path(path)}: is {_file_kind(st.st_mode)}, expected a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise DataError(f"{display_path(path)}: {st.st_size / 2**20:,.0f} MiB is more than the "
                        f"{max_bytes / 2**20:,.0f} MiB this reads")


def check_regular_file(path, max_bytes=None):
    """A DataError naming `path` unless it is a regular file of at most `max_bytes` (a FIFO, a device, a folder
    or an over-large file is refused before anything opens it)."""
    try:
        _check_regular(path, Path(path).stat(), max_bytes)
    except FileNotFoundError:
        raise DataError(f"{display_path(path)}: file not found") from None
    except OSError as e:
        raise DataError(f"{display_path(path)}: cannot read file ({e.strerror})") from None


def read_file_bytes(path, max_bytes=None):
    """The bytes of a regular file of at most `max_bytes`, or a DataError naming it. The type and size are checked
    before anything is read (a FIFO would hang, a device never end), and again on the opened file."""
    path = Path(path)
    try:
        _check_regular(path, path.stat(), max_bytes)
        # O_NONBLOCK: should the path have become a FIFO since, opening it does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            _check_regular(path, os.fstat(f.fileno()), max_bytes)
            data = f.read(-1 if max_bytes is None else max_bytes + 1)
    except FileNotFoundError:
        raise DataError(f"{display_path(path)}: file not found") from None
    except OSError as e:
        raise DataError(f"{display_path(path)}: cannot read file ({e.strerror})") from None
    if max_bytes is not None and len(data) > max_bytes:  # it grew while being read
        raise DataError(f"{display_path(path)}: more than the {max_bytes / 2**20:,.0f} MiB this reads")
    return data


def read_text(path, max_bytes=None):
    """A data file's text, or a DataError naming the file: missing, a folder (or a FIFO, a device), larger than
    `max_bytes`, unreadable, or not UTF-8."""
    raw = read_file_bytes(path, max_bytes)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{display_path(path)}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{display_path(path)}: file is empty")
    return text


def parse_jsonl(path, text):
    """[(line number, value)] of JSON Lines text: split at "\\n" only (and a "\\r" before it), so that U+2028,
    U+2029 or U+0085 inside a string, which json.dumps(ensure_ascii=False) writes as they are, stay in their record
    (str.splitlines() would cut the line there). Blank lines are skipped. The one JSONL reader of the project."""
    records = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip(" \t\r"):
            continue
        try:
            records.append((line_no, json.loads(line)))
        except RecursionError:
            raise DataError(f"{display_path(path)}: line {line_no}: JSON nested too deeply") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{display_path(path)}: line {line_no}: not valid JSON ({e.msg})") from None
    return records


def read_jsonl(path, max_bytes=None):
    """[(line number, value)] of a JSON Lines file (parse_jsonl after read_text's checks)."""
    return parse_jsonl(path, read_text(path, max_bytes))


def _parse_json_records(path, text):
    """A JSON list of objects, or JSONL (one object per line)."""
    is_jsonl = str(path).endswith(".jsonl")
    if not is_jsonl:
        try:
            data = json.loads(text)
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply") from None
        except json.JSONDecodeError as e:
            head = text.lstrip().split("\n", 1)[0]
            if not (head.startswith("{") and "\n" in text.strip()):
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
            is_jsonl = True  # a .json file holding JSON Lines
        else:
            if isinstance(data, dict):
                raise DataError(f"{path}: top-level JSON object; expected a list of records (or JSONL)")
            if not isinstance(data, list):
                raise DataError(f"{path}: top-level JSON {type(data).__name__}; expected a list of records")
            return data
    return [record for _, record in parse_jsonl(path, text)]


def _string_field(path, index, record, field, required=True):
    if field not in record:
        if required:
            raise DataError(f"{path}: record {index}: missing field '{field}'")
        return ""
    value = record[field]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{path}: record {index}: field '{field}' must be a string, got {kind}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800": no tokenizer can take it
        raise DataError(f"{path}: record {index}: field '{field}' holds an invalid \\u escape (lone surrogate)") from None
    return value


EVAL_SPLITS = ("tuning", "heldout")


def normalize_record(path, index, record):
    """One raw record (Alpaca, HealthCareMagic or iCliniq) -> {'instruction', 'input', 'output'}."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {index}: expected a JSON object, got {type(record).__name__}")
    if "answer_icliniq" in record:  # iCliniq: the patient text is `input`, the doctor's answer `answer_icliniq`
        return {
            "instruction": CHATDOCTOR_INSTRUCTION,
            "input": _string_field(path, index, record, "input"),
            "output": _string_field(path, index, record, "answer_icliniq"),
        }
    if "instruction" not in record and "output" not in record:
        raise DataError(
            f"{path}: record {index}: unknown format (fields {sorted(record)[:6]}); expected Alpaca "
            "('instruction', 'input', 'output') or iCliniq ('input', 'answer_icliniq')"
        )
    normalized = {
        "instruction": _string_field(path, index, record, "instruction"),
        "input": _string_field(path, index, record, "input", required=False),
        "output": _string_field(path, index, record, "output"),
    }
    if "accepted" in record:  # eval sets: the diagnoses that count as right (data/lay_questions.json)
        accepted = record["accepted"]
        if not (isinstance(accepted, list) and accepted and all(isinstance(a, str) and a for a in accepted)):
            raise DataError(f"{path}: record {index}: field 'accepted' must be a non-empty list of disease names")
        normalized["accepted"] = accepted
    if "split" in record:  # eval sets: "tuning" (choices may be made on it) or "heldout" (only reported)
        if record["split"] not in EVAL_SPLITS:
            raise DataError(f"{path}: record {index}: field 'split' must be one of {', '.join(EVAL_SPLITS)}")
        normalized["split"] = record["split"]
    return normalized


def load_records(path):
    """All records of one Alpaca / HealthCareMagic / iCliniq file (JSON list or JSONL), validated."""
    text = read_text(path)
    raw = _parse_json_records(path, text)
    if not raw:
        raise DataError(f"{path}: no records (empty list)")
    return [normalize_record(path, i, r) for i, r in enumerate(raw)]


def load_data(data_path):
    """`--data_path`: one file or several, comma-separated; records concatenated in order."""
    paths = [p.strip() for p in str(data_path).split(",") if p.strip()]
    if not paths:
        raise DataError("--data_path is empty")
    records = []
    for path in paths:
        records.extend(load_records(path))
    return records


# ----------------------------------------------------------------------------- tokenization

def tokenize_supervised(records, tokenizer, max_length):
    """Records -> [{'input_ids', 'labels'}], loss only on the response (which ends in EOS).

    One batched pass over prompt+response; the prompt length is the number of tokens that start inside
    the prompt, which reproduces the original two-pass Alpaca labels on every untruncated record.
    Records whose response is cut away entirely by `max_length` are dropped (all-masked labels give NaN).
    """
    prompts = [build_prompt(r) for r in records]
    texts = [p + r["output"] + tokenizer.eos_token for p, r in zip(prompts, records)]
    encoded = tokenizer(
        texts, max_length=max_length, truncation=True, return_offsets_mapping=True, return_attention_mask=False
    )
    examples, dropped = [], 0
    for prompt, ids, offsets in zip(prompts, encoded["input_ids"], encoded["offset_mapping"]):
        prompt_len = sum(1 for start, _ in offsets if start < len(prompt))
        if prompt_len >= len(ids):
            dropped += 1
            continue
        examples.append({"input_ids": list(ids), "labels": [IGNORE_INDEX] * prompt_len + list(ids[prompt_len:])})
    if dropped:
        logger.warning(f"dropped {dropped} of {len(records)} records: prompt fills all {max_length} tokens")
    return examples


def tokenizer_fingerprint(tokenizer):
    """Hash of the tokenizer's full serialisation, without the per-call truncation/padding settings
    (cleared for the moment of serialising, then restored): hashing the raw string skips a JSON round
    trip of the 49k-entry vocabulary, most of a warm (cached) start."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation(), backend.no_padding()
        try:
            text = backend.to_str()
        finally:
            if truncation:
                backend.enable_truncation(**truncation)
            if padding:
                backend.enable_padding(**{k: v for k, v in padding.items() if k != "length" or v is not None})
    else:
        text = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((text + str(tokenizer.eos_token)).encode()).hexdigest()


def tokenization_cache_key(records, tokenizer, max_length):
    h = hashlib.sha256()
    h.update(json.dumps(records, ensure_ascii=False).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(PROMPT_DICT).encode())
    h.update(f"max_length={max_length};v2".encode())
    return h.hexdigest()[:24]


def _save_examples(path, examples):
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    ids = np.concatenate([e["input_ids"] for e in examples]).astype(np.int32)
    labels = np.concatenate([e["labels"] for e in examples]).astype(np.int32)
    buffer = io.BytesIO()
    np.savez(buffer, lengths=lengths, input_ids=ids, labels=labels)
    write_atomic(path, buffer.getvalue())  # readers never see a half-written cache


class TokenizedExamples(Sequence):
    """Cached examples as two flat arrays; example i is built as lists when read, so a warm start does
    not make a million Python ints up front. Reads (and compares) like the list tokenize_supervised returns."""

    def __init__(self, bounds, input_ids, labels):
        self.bounds, self.input_ids, self.labels = bounds, input_ids, labels

    def __len__(self):
        return len(self.bounds) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self.bounds[i], self.bounds[i + 1]
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(x == y for x, y in zip(self, other))


def _load_examples(path):
    with np.load(path) as z:
        bounds = np.concatenate([[0], np.cumsum(z["lengths"])]).tolist()
        return TokenizedExamples(bounds, z["input_ids"], z["labels"])


def tokenize_cached(records, tokenizer, max_length, cache_dir):
    """tokenize_supervised, cached on disk by data, tokenizer, template and length."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tokenized-{tokenization_cache_key(records, tokenizer, max_length)}.npz"
    if path.exists():
        logger.info(f"tokenized data from cache {path}")
        return _load_examples(path)
    examples = tokenize_supervised(records, tokenizer, max_length)
    if not examples:
        raise DataError(f"no usable records: every prompt is longer than model_max_length={max_length}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    _save_examples(path, examples)
    logger.info(f"tokenized {len(examples)} records, cached in {path}")
    return examples


def collate_padded(examples, pad_token_id):
    """Right-pad a batch. The attention mask comes from the lengths, not from pad ids: many tokenizers
    (SmolLM2's among them) use EOS as PAD, and masking by id would hide the EOS the model must learn."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(examples, logits_only_where_supervised=True):
    """Padding-free batch: the examples concatenated in one row, position ids restarting at 0 for each, and
    the example boundaries as `cu_seq_lens_*` (transformers' DataCollatorWithFlattening). No token attends
    across examples: `packed_sdpa_attention` and flash attention read the boundaries, plain SDPA and eager
    get a block-diagonal causal mask built from the position ids. With `logits_only_where_supervised`, the LM head
    runs only where a next-token label exists (`logits_to_keep` mask + `shift_labels`): the prompt tokens,
    about two thirds of a ChatDoctor example, skip the 49k-vocab projection. The loss is the same sum over
    the same targets, so it is unchanged."""
    import torch
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                       return_flash_attn_kwargs=True)(examples)
    if logits_only_where_supervised:
        labels = batch["labels"]
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = shifted != IGNORE_INDEX
        batch["logits_to_keep"] = keep  # boolean (1, tokens): the LM head sees only these positions
        batch["shift_labels"] = shifted[keep]
    return batch


PACKED_ATTENTION = "sdpa_packed"


def packed_sdpa_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """Varlen attention for packed rows where flash-attn is missing (CPU, most GPUs without the package):
    SDPA once per example, causal within it. The block-diagonal mask transformers builds for a packed row
    would make SDPA compute every token against the whole row, (row / example length) times the work.
    Without sequence boundaries (a padded batch, generation) it is plain SDPA with the mask."""
    import torch
    from transformers import AttentionInterface

    sdpa_attention_forward = AttentionInterface()["sdpa"]
    kwargs.pop("is_causal", None)
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True,
                               **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=1), None


def use_packed_attention(model):
    """Switch a model with SDPA attention to `packed_sdpa_attention` (flash attention is kept: it is varlen already)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    current = model.config._attn_implementation  # no public getter (docs/PRIVATE_API.md)
    if current != "sdpa":
        return current
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, AttentionMaskInterface()["sdpa"])
    model.set_attn_implementation(PACKED_ATTENTION)
    return PACKED_ATTENTION


# ----------------------------------------------------------------------------- models

def recorded_prompt_style(model_path):
    """The prompt style train.py recorded in `model_path`, or None for a model trained elsewhere."""
    path = Path(model_path) / PROMPT_STYLE_FILE
    if not path.is_file():
        return None
    try:
        style = json.loads(path.read_text(encoding="utf-8"))["prompt_style"]
    except (ValueError, KeyError, TypeError):
        raise ModelLoadError(f"{path}: expected a JSON object with 'prompt_style'") from None
    if style not in PROMPT_STYLES:
        raise ModelLoadError(f"{path}: prompt_style {style!r} is not one of {', '.join(PROMPT_STYLES)}")
    return style


def prompt_style_for(model_path, requested=None):
    """The style to prompt `model_path` with: the one asked for, else the one it was trained on, else the default."""
    return requested or recorded_prompt_style(model_path) or DEFAULT_PROMPT_STYLE


def _looks_like_hub_id(name):
    return not os.path.isabs(name) and not name.startswith((".", "~")) and name.count("/") == 1


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# A LoRA adapter folder (peft format), as train.py --lora_r saves it: loaded onto its base model.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _has_tokenizer_files(folder):
    return any((Path(folder).expanduser() / f).is_file() for f in TOKENIZER_FILES)


def is_adapter_folder(path):
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base_model(path):
    """The base model of a LoRA adapter folder: base_model_name_or_path in its adapter_config.json, checked."""
    config = Path(path).expanduser() / ADAPTER_CONFIG
    base = _local_json(path, ADAPTER_CONFIG).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{config}: no base_model_name_or_path, so the adapter's base model is unknown")
    if Path(base).expanduser().resolve() == Path(path).expanduser().resolve():
        raise ModelLoadError(f"{config}: base_model_name_or_path names the adapter folder itself")
    try:
        check_model_path(base)
    except ModelLoadError as e:
        raise ModelLoadError(f"{config}: base model {e} (base_model_name_or_path; a relative path is read from "
                             "the current directory)") from None
    return base


def check_model_path(path, local=False):
    """A local model folder must hold a config and tokenizer files; a hub id ('org/name') and a .gguf file are
    passed on, unless `local`: then only a model folder on this machine will do."""
    path = str(path)
    p = Path(path).expanduser()
    if not local and p.is_file() and p.suffix == ".gguf":
        return
    if not p.exists():
        if not local and _looks_like_hub_id(path):
            return
        raise ModelLoadError(f"{path}: model folder not found")
    if not p.is_dir():
        raise ModelLoadError(f"{path}: not a model folder (expected a directory with config.json)")
    if (p / ADAPTER_CONFIG).is_file():
        if not any((p / f).is_file() for f in ADAPTER_WEIGHTS):
            raise ModelLoadError(f"{path}: no adapter weights ({ADAPTER_WEIGHTS[0]})")
        adapter_base_model(path)
        return
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json, not a Hugging Face model folder")
    if not _has_tokenizer_files(p):
        raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json / tokenizer.model)")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ModelLoadError(f"{path}: no weights (*.safetensors / *.bin)")


def _from_pretrained(auto_class, what, path, **kwargs):
    """auto_class.from_pretrained on a checked local folder, a hub id or a .gguf file; one-line errors."""
    check_model_path(path)
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        kwargs["gguf_file"] = p.name
        path = str(p.parent)
    try:
        return auto_class.from_pretrained(str(path), **kwargs)
    except Exception as e:  # transformers raises many kinds, some with multi-line text
        raise ModelLoadError(f"{path}: cannot load {what} ({first_line(e)})") from None


# The 2023 LLaMA conversions (the paper's base model) used class names that were renamed Llama* before release.
LEGACY_LLAMA_TOKENIZER = "LLaMATokenizer"
LEGACY_LLAMA_MODEL = "LLaMAForCausalLM"
SENTENCEPIECE_SPECIAL_IDS = {"bos_token": "bos_id", "eos_token": "eos_id", "unk_token": "unk_id"}


def _local_json(folder, name):
    """A JSON object from a local model folder; {} when there is none (transformers then says what is wrong)."""
    try:
        data = json.loads((Path(folder).expanduser() / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value  # a dict: a saved AddedToken


def _unnamed_special_tokens(folder):
    """bos/eos/unk that the tokenizer files name as "" (early LLaMA conversions), or never name in a folder
    without tokenizer.json (where they are named, tokenizer.json decides what is added to an encoding)."""
    declared = [_local_json(folder, "tokenizer_config.json"), _local_json(folder, "special_tokens_map.json")]
    sentencepiece_only = not (folder / "tokenizer.json").is_file()
    unnamed = []
    for name in SENTENCEPIECE_SPECIAL_IDS:
        values = [_token_text(d[name]) for d in declared if name in d]
        if (values and not all(values)) or (not values and sentencepiece_only):
            unnamed.append(name)
    return unnamed


def _sentencepiece_special_tokens(folder, names):
    """{name: (piece, id)} for the ids the sentencepiece model itself reserves (-1: it has none)."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise ModelLoadError(f"{folder}: cannot read tokenizer.model ({first_line(e)})") from None
    ids = {name: getattr(sp, SENTENCEPIECE_SPECIAL_IDS[name])() for name in names}
    return {name: (sp.id_to_piece(i), i) for name, i in ids.items() if i >= 0}


def _special_tokens_from_sentencepiece(path):
    """from_pretrained arguments for a 2023 LLaMA tokenizer folder: empty bos/eos/unk (today a RecursionError)
    set from its tokenizer.model, with BOS added to every encoding as the 2023 LlamaTokenizer did. Logs one
    line when it repairs anything."""
    folder = Path(path).expanduser()
    unnamed = _unnamed_special_tokens(folder) if (folder / "tokenizer.model").is_file() else []
    tokens = _sentencepiece_special_tokens(folder, unnamed) if unnamed else {}
    if not tokens:
        return {}
    kwargs = {name: piece for name, (piece, _) in tokens.items()}
    repaired = ", ".join(f"{name.split('_')[0]} {piece} (id {i})" for name, (piece, i) in tokens.items())
    if "bos_token" in tokens:
        kwargs["add_bos_token"] = True
        repaired += "; BOS added at the start of every encoding"
    logger.info(f"{path}: tokenizer files leave special tokens empty; from tokenizer.model: {repaired}")
    return kwargs


def _tokenizer_class(path):
    """AutoTokenizer, or LlamaTokenizer for a folder that names the 2023 class LLaMATokenizer (transformers 5
    maps no model type to LlamaTokenizer any more and would guess a generic tokenizer)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    declared = _local_json(path, "tokenizer_config.json").get("tokenizer_class")
    return LlamaTokenizer if declared == LEGACY_LLAMA_TOKENIZER else AutoTokenizer


def _check_sentencepiece_installed(path):
    """Without sentencepiece and protobuf, transformers reads a lone tokenizer.model as a tiktoken file and
    reports a missing tiktoken instead."""
    folder = Path(path).expanduser()
    if not (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
        return
    try:
        import google.protobuf  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{path}: reading tokenizer.model needs sentencepiece and protobuf "
                             "(pip install -r requirements.txt)") from None


def load_tokenizer(path, trust_remote_code=False, **kwargs):
    if is_adapter_folder(path) and not _has_tokenizer_files(path):
        path = adapter_base_model(path)  # an adapter saved without a tokenizer uses its base model's
    _check_sentencepiece_installed(path)
    kwargs = {**_special_tokens_from_sentencepiece(path), **kwargs}
    return _from_pretrained(_tokenizer_class(path), "tokenizer", path, trust_remote_code=trust_remote_code, **kwargs)


def _model_class(path):
    """AutoModelForCausalLM, or LlamaForCausalLM for a config that names the 2023 class LLaMAForCausalLM."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    architectures = _local_json(path, "config.json").get("architectures") or []
    return LlamaForCausalLM if LEGACY_LLAMA_MODEL in architectures else AutoModelForCausalLM


def load_model(path, dtype=None, trust_remote_code=False, **kwargs):
    if is_adapter_folder(path):
        return _load_with_adapter(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    return _from_pretrained(
        _model_class(path), "model", path, dtype=dtype, trust_remote_code=trust_remote_code, weights_only=True,
        **kwargs,
    )


def _load_with_adapter(path, **kwargs):
    """A LoRA adapter folder: its base model with the adapter applied and merged into the weights, so callers get
    a plain model. On a quantized base (a quantization_config) the adapter stays separate: merging into 4-bit
    weights would round most of it away."""
    from peft import PeftModel
    from transformers import GenerationConfig

    check_model_path(path)
    folder, base = Path(path).expanduser(), adapter_base_model(path)
    try:
        model = load_model(base, **kwargs)
    except ModelLoadError as e:  # e.g. a relative base path read from another directory, taken for a hub id
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG}: base model {e}") from None
    if (folder / "generation_config.json").is_file():  # the EOS training taught, as train.py saves it
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    _resize_embeddings_to_adapter(model, folder)
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except Exception as e:  # peft raises many kinds (size mismatch, unknown keys, bad config)
        raise ModelLoadError(f"{path}: cannot apply the LoRA adapter to its base model ({first_line(e)})") from None
    return model if "quantization_config" in kwargs else model.merge_and_unload()


def _resize_embeddings_to_adapter(model, folder):
    """peft saves the embedding matrices with the adapter when training grew the vocabulary (train.py adds a pad
    token to a tokenizer without one); the base must have their size before they load."""
    from safetensors import safe_open

    weights = Path(folder) / ADAPTER_WEIGHTS[0]
    embedding = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    if not (weights.is_file() and name):
        return
    with safe_open(str(weights), "pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(f"{name}.weight")]
    if rows and rows[0] != embedding.weight.shape[0]:
        model.resize_token_embeddings(rows[0], mean_resizing=False)


def load_model_and_tokenizer(path, dtype=None, trust_remote_code=False):
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer


def first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def ensure_pad_token(tokenizer, model, pad_token="[PAD]"):
    """Give a tokenizer without PAD one, as the original does: a new token whose input and output
    embeddings are the mean of the existing ones. BOS/EOS stay the model's own."""
    if tokenizer.pad_token is not None:
        return False
    import torch

    tokenizer.add_special_tokens({"pad_token": pad_token})
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = len(tokenizer) - old
    if new > 0:
        with torch.no_grad():
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
                if embedding is not None:
                    embedding.weight[-new:] = embedding.weight[:-new].mean(dim=0, keepdim=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info(f"tokenizer had no pad token: added {pad_token!r} (id {tokenizer.pad_token_id}), mean-initialised")
    return True
