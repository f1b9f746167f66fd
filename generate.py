"""InstructorDoctor: patient/doctor exchanges generated from a disease database, as ChatDoctor made GenMedGPT-5k.

    python generate.py --database format_dataset.csv --output data/generated.json --limit 20      # embedded teacher
    python generate.py --database format_dataset.csv --output data/generated.json \\
        --base_url http://127.0.0.1:8000/v1 --model teacher --concurrency 8                     # any OpenAI-compatible server
    python generate.py --database format_dataset.csv --validate data/chatdoctor5k.json --limit 50   # score existing data
    python train.py --data_path data/generated.json ...                                          # ready to train on

"We input each message from the disease database separately as a prompt into the ChatGPT API ... our prompts
contain the gold standard of diseases and symptoms, and drugs" (the paper). Each row (format_dataset.csv's columns,
or JSON Lines of {"disease", "symptoms", "tests", "medications"}) gives --per_disease exchanges. By default a teacher
writes each one in two calls, which a small model manages far better than one: the patient's message from the
symptoms, then the doctor's answer from that message and the gold standard (disease, tests, medications).
--calls 1 asks for the whole exchange at once, as the paper's prompt to ChatGPT did.

Every exchange is checked before it is kept (REASONS): it parses into a patient and a doctor part; the doctor
names the disease, one of the row's tests and one of its medications; with --voice lay the patient does not name
the disease; it is not a near-duplicate (MinHash, datasketch) of one kept before it. Each exchange is appended to
OUTPUT.work.jsonl as soon as it is made, so a killed run started again with the same command goes on where it
stopped (nothing generated twice, nothing lost). At the end OUTPUT (GenMedGPT's Alpaca format), the rejected
exchanges with their reasons (OUTPUT.rejected.jsonl) and a report (OUTPUT.report.json) are written atomically.
The API key of an endpoint is read from $OPENAI_API_KEY (backend.py), never from a flag.
"""
import argparse
import csv
import hashlib
import io
import json
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backend import DEFAULT_RETRIES, DEFAULT_TIMEOUT, Backend, BackendError, Reply
from knowledge import read_disease_csv
from utils import CHATDOCTOR_INSTRUCTION, DataError, ModelLoadError, fail, read_text, relative, write_atomic, \
    write_json_atomic

ROOT = Path(__file__).resolve().parent
DEFAULT_TEACHER = ROOT / "models" / "SmolLM2-135M-Instruct"
VOICES = ("paper", "lay")
# What a row must have (format_dataset.csv's column names; JSON Lines use the second name).
CSV_COLUMNS = {"disease": "disease", "Symptom": "symptoms", "TestsAndProcedures": "tests",
               "commonMedications": "medications"}
# Why an exchange is not kept, in the order they are checked.
REASONS = ("unparsed", "patient_names_disease", "disease_not_named", "no_test_named", "no_medication_named",
           "near_duplicate")
PROMPT_ITEMS = 3  # symptoms are listed up to 2x this; tests and medications this many: a small model copies short lists
REQUIRE = ("disease", "test", "medication")  # what the doctor's answer must name (--require)
MIN_WORDS = {"patient": 5, "doctor": 8}  # shorter is a fragment, not a message
DEDUP_THRESHOLD = 0.7  # estimated Jaccard similarity of word 3-grams from which two exchanges are near-duplicates
NUM_PERM = 128
MAX_TOKENS = {"patient": 96, "doctor": 192, "exchange": 288}
TEMPLATES = ("auto", "own", "chatml")
# SmolLM2's own (ChatML) template. The project's model folders carry chat.py's ChatDoctor template instead (prepare.py,
# train.py), which has no place for a system message or a worked example: a ChatML-trained teacher gets this back.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ----------------------------------------------------------------------------- the prompts
# Two calls: the patient's message from the symptoms, then the doctor's answer carrying the gold standard.
PATIENT_SYSTEM = "You write realistic messages that patients send to their doctor. You write only the message."
PATIENT_PROMPT = {
    "paper": ("A patient has these symptoms: {symptoms}.\nWrite the message the patient sends to the doctor. "
              "Start with \"Doctor,\" and describe two or three of the symptoms in the first person, in one or two "
              "sentences. Write only the patient's message."),
    "lay": ("A patient has these symptoms: {symptoms}.\nWrite the message the patient sends to the doctor. "
            "Start with \"Doctor,\" and describe two or three of the symptoms in everyday words, as someone without "
            "medical training would, in the first person, in one or two sentences. Do not name any disease. "
            "Write only the patient's message."),
}
DOCTOR_SYSTEM = "You are a doctor answering a patient's message. You write only the doctor's reply."
DOCTOR_PROMPT = ("The patient wrote: \"{patient}\"\n\nThe patient has {disease}. Write the doctor's reply in three or "
                 "four sentences: tell the patient that they may have {disease}, recommend the tests {tests}, and "
                 "recommend the medications {medications}. Write only the doctor's reply.")
# One call, as the paper's prompt to ChatGPT.
EXCHANGE_SYSTEM = "You write realistic conversations between a patient and a doctor."
EXCHANGE_PROMPT = ("Write a conversation between a patient and a doctor. The patient has {disease} and "
                   "describes some of these symptoms{voice}: {symptoms}. The doctor says the patient may have "
                   "{disease}, recommends the tests {tests}, and recommends the medications {medications}.\n"
                   "Write exactly two paragraphs, the first starting with \"Patient:\" and the second with \"Doctor:\".")
EXCHANGE_VOICE = {"paper": "", "lay": " in everyday words, without naming the disease"}
# One worked example before the request (a small model copies its form); it is skipped for its own disease.
EXAMPLE = {
    "disease": "Acute sinusitis",
    "symptoms": ["Nasal congestion", "Sinus congestion", "Headache", "Facial pain", "Cough", "Fever"],
    "tests": ["Influenzavirus antibody assay", "Nasal endoscopy", "CT scan of the sinuses"],
    "medications": ["Amoxicillin", "Fluticasone nasal", "Pseudoephedrine"],
    "patient": {"paper": "Doctor, my nose has been blocked for ten days, my face hurts around my eyes and I have "
                         "a headache and a mild fever.",
                "lay": "Doctor, my nose has been blocked for ten days, my face aches around my eyes when I bend "
                       "down, and I feel hot and tired."},
    "doctor": "Based on your symptoms, you may have acute sinusitis. I would like to do a nasal endoscopy and an "
              "influenzavirus antibody assay to confirm it. I will prescribe amoxicillin for the infection and "
              "fluticasone nasal spray for the congestion. Come back if the fever does not go down in a few days.",
}
ROLE_LABEL = re.compile(r"^\W*(?:patient|doctor|chatdoctor|dr\.?)\s*\W*:\W*", re.IGNORECASE)
NEXT_TURN = re.compile(r"\n\W*(?:patient|doctor|chatdoctor)\W*:|\n\n(?=\W*(?:patient|doctor)\b)", re.IGNORECASE)
EXCHANGE_PARTS = re.compile(r"patient\W*:\W*(?P<patient>.+?)\n\W*doctor\W*:\W*(?P<doctor>.+)", re.IGNORECASE | re.DOTALL)


@dataclass
class Row:
    number: int  # 0-based position in the database
    source: str  # path:line of the row
    disease: str
    symptoms: list
    tests: list
    medications: list


@dataclass
class Exchange:
    task: str  # "row:k", k-th exchange of the row
    row: int
    source: str
    disease: str
    patient: str = ""
    doctor: str = ""
    reason: str | None = None  # None: passed the checks made as it was generated (near-duplicates come at the end)
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    raw: list = field(default_factory=list)  # the teacher's own texts, for the rejected file
    failed: list = field(default_factory=list)  # every check it failed (reason is the first)


# ----------------------------------------------------------------------------- the database

def read_database(path):
    """The rows of a disease database: a CSV of format_dataset.csv's shape or JSON Lines; DataError otherwise."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return read_database_jsonl(path)
    text = read_text(path)
    header = next(csv.reader(io.StringIO(text)), [])
    missing = [column for column in CSV_COLUMNS if column not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}: expected {', '.join(CSV_COLUMNS)} (got {header})")
    rows = []
    for number, entry in enumerate(read_disease_csv(path)):
        row = Row(number, entry.source, entry.title, *(entry.fields[key] for key in ("symptoms", "tests", "medications")))
        if not row.symptoms:
            raise DataError(f"{entry.source.rsplit(':', 1)[0]}: row {number + 1}: field 'Symptom' is empty")
        rows.append(row)
    return rows


def read_database_jsonl(path):
    rows = []
    for line_no, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{path}: line {line_no}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line_no}: expected an object with {', '.join(CSV_COLUMNS.values())}")
        disease = record.get("disease")
        if not isinstance(disease, str) or not disease.strip():
            raise DataError(f"{path}: line {line_no}: field 'disease' must be a non-empty string")
        lists = {}
        for key in ("symptoms", "tests", "medications"):
            value = record.get(key, [])
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise DataError(f"{path}: line {line_no}: field '{key}' must be a list of strings")
            lists[key] = [item.strip() for item in value if item.strip()]
        if not lists["symptoms"]:
            raise DataError(f"{path}: line {line_no}: field 'symptoms' is empty")
        rows.append(Row(len(rows), f"{path}:{line_no}", disease.strip(), **lists))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------- prompts and parsing

def listing(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1] if items else "none"


def plain(name):
    """A test or drug name as a person says it: 'Alprazolam (Xanax)' -> 'Alprazolam'."""
    return re.sub(r"\s*\([^)]*\)", "", name).strip() or name


def gold_fields(row, items=PROMPT_ITEMS):
    return {"disease": row["disease"] if isinstance(row, dict) else row.disease,
            "symptoms": listing(s.lower() for s in _get(row, "symptoms")[:2 * items]),
            "tests": listing(plain(t).lower() for t in _get(row, "tests")[:items]),
            "medications": listing(plain(m) for m in _get(row, "medications")[:items])}


def _get(row, key):
    return row[key] if isinstance(row, dict) else getattr(row, key)


def _with_example(system, user_for, answer_for, disease):
    """system, the worked example (unless it is this very disease), then the request."""
    messages = [{"role": "system", "content": system}]
    if disease.lower() != EXAMPLE["disease"].lower():
        messages += [{"role": "user", "content": user_for(EXAMPLE)}, {"role": "assistant", "content": answer_for}]
    return messages


def patient_messages(row, voice, items=PROMPT_ITEMS):
    def user_for(r):
        return PATIENT_PROMPT[voice].format(**gold_fields(r, items))
    messages = _with_example(PATIENT_SYSTEM, user_for, EXAMPLE["patient"][voice], row.disease)
    return messages + [{"role": "user", "content": user_for(row)}]


def doctor_messages(row, patient, items=PROMPT_ITEMS):
    def user_for(r, said):
        return DOCTOR_PROMPT.format(patient=said, **gold_fields(r, items))
    messages = _with_example(DOCTOR_SYSTEM, lambda r: user_for(r, EXAMPLE["patient"]["paper"]), EXAMPLE["doctor"],
                             row.disease)
    return messages + [{"role": "user", "content": user_for(row, patient)}]


def exchange_messages(row, voice, items=PROMPT_ITEMS):
    def user_for(r):
        return EXCHANGE_PROMPT.format(voice=EXCHANGE_VOICE[voice], **gold_fields(r, items))
    example = f"Patient: {EXAMPLE['patient'][voice]}\n\nDoctor: {EXAMPLE['doctor']}"
    messages = _with_example(EXCHANGE_SYSTEM, user_for, example, row.disease)
    return messages + [{"role": "user", "content": user_for(row)}]


def clean_turn(text):
    """One turn from a teacher's text: its role label dropped, cut where another turn starts, unquoted."""
    text = ROLE_LABEL.sub("", text.strip(), count=1)
    text = NEXT_TURN.split(text, maxsplit=1)[0]
    text = " ".join(text.split()).strip()
    if len(text) > 1 and text[0] in "\"'“" and text[-1] in "\"'”":
        text = text[1:-1].strip()
    return text


def split_exchange(text):
    """(patient, doctor) from one text holding both turns ("Patient: ... Doctor: ..."); ("", "") if it does not."""
    found = EXCHANGE_PARTS.search(text.strip())
    if not found:
        return "", ""
    return clean_turn(found["patient"]), clean_turn(found["doctor"])


# ----------------------------------------------------------------------------- validation

def _words(text):
    """Lower-case words with a plural 's' dropped, space-padded: ' blood test ' is found in ' two blood tests '."""
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    return " " + " ".join(t[:-1] if len(t) > 3 and t.endswith("s") and not t.endswith("ss") else t
                          for t in tokens) + " "


def aliases(name):
    """The ways a text can name a disease, test or drug: whole, without its parentheses, or what they hold."""
    inner = re.findall(r"\(([^)]*)\)", name)
    forms = [name, plain(name)] + [part for part in inner if len(part) >= 4]
    return {_words(form) for form in forms if _words(form).strip()}


def names_any(text, names):
    padded = _words(text)
    return any(alias in padded for name in names for alias in aliases(name))


def failed_checks(exchange, row, voice, require=REQUIRE):
    """Every check (REASONS but near_duplicate) the exchange fails, in order; `require`: which of the doctor's
    disease, test and medication are checked."""
    if len(exchange.patient.split()) < MIN_WORDS["patient"] or len(exchange.doctor.split()) < MIN_WORDS["doctor"]:
        return ["unparsed"]
    failed = []
    if voice == "lay" and names_any(exchange.patient, [row.disease]):
        failed.append("patient_names_disease")
    if "disease" in require and not names_any(exchange.doctor, [row.disease]):
        failed.append("disease_not_named")
    if "test" in require and row.tests and not names_any(exchange.doctor, row.tests):
        failed.append("no_test_named")
    if "medication" in require and row.medications and not names_any(exchange.doctor, row.medications):
        failed.append("no_medication_named")
    return failed


def check(exchange, row, voice, require=REQUIRE):
    """The first reason (REASONS) the exchange cannot be kept, or None. Near-duplicates are found later."""
    failed = failed_checks(exchange, row, voice, require)
    exchange.failed = failed_checks(exchange, row, voice)  # all of them, for the report
    return failed[0] if failed else None


class NearDuplicates:
    """MinHash LSH over word 3-grams: `seen(text)` is True when a text like it was added before, else adds it."""

    def __init__(self, threshold=DEDUP_THRESHOLD, num_perm=NUM_PERM):
        from datasketch import MinHash, MinHashLSH

        self.minhash, self.num_perm = MinHash, num_perm
        self.index = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.count = 0

    def seen(self, text):
        words = text.lower().split()
        shingles = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
        signature = self.minhash(num_perm=self.num_perm, seed=1)
        signature.update_batch([s.encode("utf-8") for s in shingles])
        if self.index.query(signature):
            return True
        self.index.insert(str(self.count), signature)
        self.count += 1
        return False


# ----------------------------------------------------------------------------- teachers

class EndpointTeacher:
    """Any OpenAI-compatible chat-completions server, through backend.py."""
    can_batch = True

    def __init__(self, base_url, model, timeout=DEFAULT_TIMEOUT, retries=DEFAULT_RETRIES):
        self.backend = Backend(base_url, model, timeout=timeout, retries=retries)
        self.name = f"{model} at {self.backend.base_url}"
        self.identity = model  # what resume compares: the same model may come back at another address

    def chat(self, messages, max_tokens, temperature, top_p, seed):
        return self.backend.chat(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


class LocalTeacher:
    """A local Hugging Face model folder, prompted through its own chat template (no server)."""
    can_batch = False  # one generate() at a time: torch already uses every core

    def __init__(self, folder, template="auto"):
        import torch

        from utils import check_model_path, load_model_and_tokenizer

        self.torch = torch
        check_model_path(folder, local=True)
        self.model, self.tokenizer = load_model_and_tokenizer(str(folder))
        if template == "chatml" or (template == "auto" and self._chatml_model_with_project_template()):
            self.tokenizer.chat_template = CHATML_TEMPLATE
        if not self.tokenizer.chat_template:
            raise ModelLoadError(f"{folder}: the tokenizer has no chat template (an instruction-tuned model has one)")
        self.model.eval()
        self.name = self.identity = relative(Path(folder).absolute())
        self.lock = threading.Lock()

    def _chatml_model_with_project_template(self):
        template = self.tokenizer.chat_template or ""
        return "<|im_start|>" in self.tokenizer.get_vocab() and (not template or "ChatDoctor" in template)

    def chat(self, messages, max_tokens, temperature, top_p, seed):
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False)
        with self.lock, self.torch.no_grad():
            self.torch.manual_seed(seed)
            output = self.model.generate(**inputs, max_new_tokens=max_tokens, **sampling,
                                         pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        new = output[0, inputs["input_ids"].shape[1]:]
        finished = len(new) < max_tokens or new[-1].item() == self.tokenizer.eos_token_id
        return Reply(self.tokenizer.decode(new, skip_special_tokens=True), "stop" if finished else "length",
                     inputs["input_ids"].shape[1], len(new))


def task_seed(seed, task):
    """Each exchange's own seed: the same whatever order, concurrency or resume produced it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}".encode()).digest()[:4], "big") >> 1


def make_exchange(teacher, row, k, args):
    """One exchange for row `row` (its k-th), checked; BackendError if the teacher cannot answer."""
    exchange = Exchange(f"{row.number}:{k}", row.number, row.source, row.disease)
    seed = task_seed(args.seed, exchange.task)

    def ask(messages, kind):
        reply = teacher.chat(messages, MAX_TOKENS[kind], args.temperature, args.top_p, seed)
        exchange.requests += 1
        exchange.tokens_in += reply.tokens_in
        exchange.tokens_out += reply.tokens_out
        exchange.raw.append(reply.text)
        return reply.text

    if args.calls == 1:
        exchange.patient, exchange.doctor = split_exchange(ask(exchange_messages(row, args.voice, args.items), "exchange"))
    else:
        exchange.patient = clean_turn(ask(patient_messages(row, args.voice, args.items), "patient"))
        if len(exchange.patient.split()) >= MIN_WORDS["patient"]:  # no second call for a failed first
            exchange.doctor = clean_turn(ask(doctor_messages(row, exchange.patient, args.items), "doctor"))
    exchange.reason = check(exchange, row, args.voice, args.require)
    return exchange


# ----------------------------------------------------------------------------- the work file (resume)

SETTINGS = ("database_sha256", "teacher", "teacher_template", "calls", "voice", "seed", "temperature", "top_p", "items",
            "require")


def run_settings(args, teacher_name):
    return {"database_sha256": hashlib.sha256(Path(args.database).read_bytes()).hexdigest(), "teacher": teacher_name,
            "teacher_template": None if args.base_url else args.teacher_template, "calls": args.calls, "voice": args.voice, "seed": args.seed, "temperature": args.temperature,
            "top_p": args.top_p, "items": args.items, "require": list(args.require)}


def work_path(output):
    return Path(f"{output}.work.jsonl")


def read_work(path, settings):
    """The exchanges an earlier run of the same settings made; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return {}
    lines = path.read_bytes().split(b"\n")
    done, good_bytes = {}, 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines):
                break  # torn by a kill: dropped, and made again
            raise DataError(f"{path}: line {number}: not valid JSON (delete the file to start over)") from None
        good_bytes += len(line) + 1
        if number == 1:
            if record.get("settings") != settings:
                changed = [k for k in SETTINGS if (record.get("settings") or {}).get(k) != settings[k]]
                raise DataError(f"{path}: made with other settings ({', '.join(changed)}): rerun with the same "
                                f"ones, or delete the file to start over")
            continue
        done[record["task"]] = Exchange(**record)
    with open(path, "r+b") as f:
        f.truncate(min(good_bytes, path.stat().st_size))
    return done


class WorkFile:
    """Appends each exchange as one JSON line, flushed to disk: a kill loses at most the line being written."""

    def __init__(self, path, settings):
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", encoding="utf-8")
        if fresh:
            self._write({"settings": settings})

    def add(self, exchange):
        self._write(asdict(exchange))

    def _write(self, record):
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


# ----------------------------------------------------------------------------- the run

def tasks_for(rows, per_disease):
    return [(row, k) for row in rows for k in range(per_disease)]


def generate(teacher, tasks, done, work, args):
    """Makes every task not in `done`, `args.concurrency` at a time, each appended to `work` as it ends."""
    from tqdm import tqdm

    todo = [(row, k) for row, k in tasks if f"{row.number}:{k}" not in done]
    workers = args.concurrency if teacher.can_batch else 1
    kept = sum(e.reason is None for e in done.values())
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="exchanges", unit="ex", dynamic_ncols=True)
    bar.set_postfix(passed=kept)
    failure = None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending, queue = set(), iter(todo)
        while True:
            while failure is None and len(pending) < 2 * workers:
                task = next(queue, None)
                if task is None:
                    break
                pending.add(pool.submit(make_exchange, teacher, *task, args))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    exchange = future.result()
                except BackendError as e:
                    failure = failure or e  # the ones in flight still finish and are kept
                    continue
                done[exchange.task] = exchange
                work.add(exchange)
                kept += exchange.reason is None
                bar.set_postfix(passed=kept)
                bar.update()
    bar.close()
    if failure:
        raise failure


def assemble(tasks, done, threshold=DEDUP_THRESHOLD):
    """The kept records in database order (near-duplicates of an earlier kept one dropped) and the rejected."""
    duplicates = NearDuplicates(threshold)
    kept, rejected = [], []
    for row, k in tasks:
        exchange = done[f"{row.number}:{k}"]
        if exchange.reason is None and duplicates.seen(f"{exchange.patient} {exchange.doctor}"):
            exchange.reason = "near_duplicate"
        if exchange.reason is None:
            kept.append({"instruction": CHATDOCTOR_INSTRUCTION, "input": exchange.patient, "output": exchange.doctor})
        else:
            rejected.append(asdict(exchange))
    return kept, rejected


def report(rows, tasks, done, kept, rejected, teacher_name, wall, resumed):
    exchanges = [done[f"{row.number}:{k}"] for row, k in tasks]
    reasons = {reason: sum(r["reason"] == reason for r in rejected) for reason in REASONS}
    return {
        "teacher": teacher_name, "rows": len(rows), "exchanges": len(exchanges),
        "requests": sum(e.requests for e in exchanges), "tokens_in": sum(e.tokens_in for e in exchanges),
        "tokens_out": sum(e.tokens_out for e in exchanges), "accepted": len(kept), "rejected": len(rejected),
        "acceptance_rate": round(len(kept) / len(exchanges), 4) if exchanges else 0.0,
        "rejected_by_reason": {r: n for r, n in reasons.items() if n},
        # each check alone: how many exchanges fail it (an exchange can fail several; the reason is the first)
        "failing_each_check": {r: sum(r in e.failed for e in exchanges) for r in REASONS[:-1]},
        "resumed_from_earlier_run": resumed,
        "wall_time_s": round(wall, 1),
    }


def side_paths(output):
    return Path(f"{output}.rejected.jsonl"), Path(f"{output}.report.json")


def run(args):
    rows = read_database(args.database)[:args.limit or None]
    teacher = (EndpointTeacher(args.base_url, args.model, args.timeout, args.retries) if args.base_url
               else LocalTeacher(args.teacher, args.teacher_template))
    settings = run_settings(args, teacher.identity)
    tasks = tasks_for(rows, args.per_disease)
    path = work_path(args.output)
    done = read_work(path, settings)
    resumed = sum(f"{row.number}:{k}" in done for row, k in tasks)
    if resumed:
        print(f"resuming: {resumed} of {len(tasks)} exchanges already in {path}", file=sys.stderr)
    start = time.time()
    work = WorkFile(path, settings)
    try:
        generate(teacher, tasks, done, work, args)
    except BackendError as e:
        made = sum(f"{row.number}:{k}" in done for row, k in tasks)
        raise BackendError(f"{e} ({made} of {len(tasks)} exchanges kept in {path}: run the same command to resume)") \
            from None
    finally:
        work.close()
    kept, rejected = assemble(tasks, done, args.dedup_threshold)
    summary = report(rows, tasks, done, kept, rejected, teacher.name, time.time() - start, resumed)
    rejected_path, report_path = side_paths(args.output)
    write_atomic(rejected_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    write_json_atomic(report_path, summary)
    write_json_atomic(args.output, kept)
    return summary


def validate_file(args):
    """Scores an existing Alpaca file (e.g. GenMedGPT-5k) with the same checks: each record goes to the database
    row whose disease its answer names, else its question (records naming none or several are left out, counted)."""
    from eval import DiseaseMatcher
    from utils import load_records

    rows = read_database(args.database)[:args.limit or None]
    by_name = {row.disease.lower(): row for row in rows}
    matcher = DiseaseMatcher([row.disease for row in read_database(args.database)])
    records = load_records(args.validate)
    done, tasks, unmatched, outside = {}, [], 0, 0
    for index, record in enumerate(records):
        name = matcher.the_one(record["output"]) or matcher.the_one(record["input"])
        if name is None:
            unmatched += 1
            continue
        row = by_name.get(name.lower())
        if row is None:
            outside += 1
            continue
        exchange = Exchange(f"{row.number}:{index}", row.number, f"{args.validate}:{index}", row.disease,
                            " ".join(record["input"].split()), " ".join(record["output"].split()))
        exchange.reason = check(exchange, row, args.voice, args.require)
        done[exchange.task] = exchange
        tasks.append((row, index))
    kept, rejected = assemble(tasks, done, args.dedup_threshold)
    summary = report(rows, tasks, done, kept, rejected, f"{args.validate} (existing data)", 0.0, 0)
    summary.update(rows_with_records=len({row.number for row, _ in tasks}), records_naming_no_single_disease=unmatched,
                   records_of_other_rows=outside)
    return summary


# ----------------------------------------------------------------------------- command line

def requirement(text):
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in REQUIRE]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(REQUIRE)}")
    return parts


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", required=True, help="disease database: CSV of format_dataset.csv's columns, "
                                                          "or JSON Lines of {disease, symptoms, tests, medications}")
    parser.add_argument("--output", help="the Alpaca-format JSON to write (with .work.jsonl, .rejected.jsonl and "
                                         ".report.json beside it)")
    parser.add_argument("--limit", type=int, default=0, help="the first N rows only (0: all)")
    teacher = parser.add_argument_group("teacher (a local model folder, or an OpenAI-compatible endpoint)")
    teacher.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="local HF model folder with a chat template")
    teacher.add_argument("--teacher_template", choices=TEMPLATES, default="auto",
                         help="the local teacher's prompt format: its own chat template, or ChatML; auto: ChatML for a "
                              "ChatML model (SmolLM2) whose folder carries the project's ChatDoctor template")
    teacher.add_argument("--base_url", help="e.g. http://127.0.0.1:8000/v1 (key: $OPENAI_API_KEY)")
    teacher.add_argument("--model", help="the model name the endpoint serves")
    teacher.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (endpoint only)")
    teacher.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                         help="retries of a timed-out, refused (429) or failed (5xx) request, with back-off")
    teacher.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for one answer")
    how = parser.add_argument_group("what to generate")
    how.add_argument("--per_disease", type=int, default=1, help="exchanges per row")
    how.add_argument("--voice", choices=VOICES, default="paper",
                     help="paper: the patient as in GenMedGPT-5k; lay: everyday words that do not name the disease")
    how.add_argument("--calls", type=int, choices=(1, 2), default=2,
                     help="2: patient then doctor (helps small teachers); 1: the whole exchange in one answer")
    how.add_argument("--items", type=int, default=PROMPT_ITEMS, help="tests and medications named in the prompt")
    how.add_argument("--require", type=requirement, default=REQUIRE, metavar="disease,test,medication",
                     help="what the doctor's answer must name to be kept (default all three)")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--temperature", type=float, default=0.7)
    how.add_argument("--top_p", type=float, default=0.95)
    how.add_argument("--dedup_threshold", type=float, default=DEDUP_THRESHOLD,
                     help="MinHash similarity from which an exchange is a near-duplicate of a kept one")
    parser.add_argument("--validate", metavar="ALPACA_JSON",
                        help="instead of generating: score an existing file (e.g. data/chatdoctor5k.json) with the "
                             "same checks, each record matched to the row whose disease its answer names")
    return parser


def check_arguments(parser, args):
    if args.base_url and not args.model:
        parser.error("--base_url needs --model (the name the endpoint serves)")
    if not args.validate and not args.output:
        parser.error("--output is required (unless --validate)")
    for name in ("limit", "per_disease", "items", "concurrency", "retries"):
        if getattr(args, name) < (0 if name in ("limit", "retries") else 1):
            parser.error(f"--{name} must be {'>= 0' if name in ('limit', 'retries') else '>= 1'}")
    if args.output and Path(args.output).resolve() == Path(args.database).resolve():
        parser.error("--output would overwrite --database")


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        summary = validate_file(args) if args.validate else run(args)
    except (DataError, ModelLoadError, BackendError) as e:
        fail(str(e))
    if args.validate and args.output:
        write_json_atomic(args.output, summary)
    print(json.dumps(summary, indent=1))
    if not args.validate:
        print(f"wrote {summary['accepted']} exchanges to {args.output} (rejected: {side_paths(args.output)[0]}, "
              f"report: {side_paths(args.output)[1]})", file=sys.stderr)
        if not summary["accepted"]:
            print(f"warning: no exchange passed the checks; {args.output} is an empty list", file=sys.stderr)


if __name__ == "__main__":
    main()
