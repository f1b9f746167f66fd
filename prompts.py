"""The dialogue format: the one place training, chat, the web page, evaluation and export take it from.

    build_prompt(record)                  the Alpaca training prompt of one record (train.py, eval.py)
    build_chat_prompt(turns, style)       a dialogue [(role, text)] as the model's prompt (chat.py, app.py, eval.py)
    grounded_message(message, context)    a patient message with its retrieved knowledge block
    visible_answer(text)                  what of generated text may be shown (cut at a stop string)
    chat_template_for(style)              the same prompt as a Jinja chat template (vLLM, TGI, llama.cpp)
    ollama_template(style)                ... and as an Ollama Go template (export_gguf.py's Modelfile)

The Jinja and Go templates are compiled from the constants below, so no front end or engine has a second copy of
the prompt to drift from the one the model was trained on. This module imports nothing of the project.
"""
import json
import string

# ----------------------------------------------------------------------------- the training template
# The Stanford Alpaca templates, verbatim: ChatDoctor trains on them.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}
# The instruction of every HealthCareMagic / iCliniq record and of the original chat prompt.
CHATDOCTOR_INSTRUCTION = (
    "If you are a doctor, please answer the medical questions based on the patient's description."
)
SAFETY_NOTICE = (
    "ChatDoctor is a research model, not a doctor: its answers can be wrong or harmful. "
    "Do not use them for medical decisions; see a qualified clinician."
)


def build_prompt(record):
    """The Alpaca prompt for one record: the with-input template only when input is non-empty."""
    template = PROMPT_DICT["prompt_input"] if record.get("input", "") != "" else PROMPT_DICT["prompt_no_input"]
    return template.format_map(record)


# ----------------------------------------------------------------------------- the dialogue
# chatdoctor: the original chat.py's prompt; alpaca: the training template (what train.py records in a model).
PROMPT_STYLES = ("chatdoctor", "alpaca")
# For a model train.py did not make: under the Alpaca template the untrained embedded default often ends its
# answer at once (docs/RESULTS.md, "Prompt styles").
DEFAULT_PROMPT_STYLE = "chatdoctor"
PATIENT = "Patient"
DOCTOR = "ChatDoctor"
GREETING = "I am ChatDoctor, what medical questions do you have?"
# A model that goes on to write the patient's next line has finished its answer; that line is never shown.
STOP_STRINGS = ("Patient:",)
TURN = "{role}: {text}"
TURN_SEPARATOR = "\n\n"
CHATDOCTOR_PROMPT = "{instruction} \n\n{history}"  # the original chat.py text; the history ends "ChatDoctor: "


def render_turns(turns):
    return TURN_SEPARATOR.join(TURN.format(role=role, text=text) for role, text in turns)


def build_chat_prompt(turns, style, instruction=CHATDOCTOR_INSTRUCTION):
    """The model's prompt for a dialogue `turns` [(role, text)], ending with the patient's newest turn.

    chatdoctor: the original chat.py text, greeting included. alpaca: the training template; a single
    question is exactly a training record, a longer dialogue goes into the input as a transcript.
    `instruction`: what a serving engine's system message puts in place of the ChatDoctor instruction.
    """
    if style == "chatdoctor":
        history = render_turns([(DOCTOR, GREETING)] + list(turns) + [(DOCTOR, "")])
        return CHATDOCTOR_PROMPT.format(instruction=instruction, history=history)
    dialogue = turns[0][1] if len(turns) == 1 else render_turns(turns)
    return build_prompt({"instruction": instruction, "input": dialogue})


def next_turn_prefix(turns, style):
    """The text every prompt of the next turn starts with: what the KV cache can hold while the patient types."""
    marker = "\x00"
    return build_chat_prompt(list(turns) + [(PATIENT, marker)], style).split(marker)[0]


# ----------------------------------------------------------------------------- the knowledge block
# How retrieved knowledge enters a prompt (chat.py, eval.py, and the retrieval-aware training set of prepare.py).
# `hits` are [(entry, score)] of knowledge.py: an entry has .id, .title, .text and .fields.
KNOWLEDGE_HEADER = "Possibly relevant entries of the medical knowledge base:"


def grounded_message(message, context):
    """The patient's message followed by the retrieved entries (format_context); the message alone when nothing
    was retrieved."""
    return f"{message}\n\n{KNOWLEDGE_HEADER}\n{context}" if context else message


def short_list(items, n):
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def format_context(hits, symptoms=6, tests=2, medications=3, passage_words=80):
    """The retrieved entries as a short table for the prompt: diseases as rows, passages as quoted text."""
    rows, passages = [], []
    for entry, _ in hits:
        f = entry.fields
        if "symptoms" in f:
            rows.append(f"{entry.title} | {short_list(f['symptoms'], symptoms)} | {short_list(f['tests'], tests)} | "
                        f"{short_list(f['medications'], medications)}")
        else:
            words = entry.text.split()
            more = " ..." if len(words) > passage_words else ""
            passages.append(f"[{entry.title}] {' '.join(words[:passage_words])}{more}")
    table = ["disease | symptoms | tests | medications", *rows] if rows else []
    return "\n".join(table + passages)


def sources_line(hits):
    """'Sources: format_dataset.csv#12 Panic disorder; notes.md#3 notes' (what the answer can be checked against)."""
    return "Sources: " + "; ".join(f"{entry.id} {entry.title}" for entry, _ in hits) if hits else ""


NO_SOURCES = "Sources: none used (the message does not describe symptoms; /sources shows what was found)"


def answer_sources_line(used):
    """The line under an answer given with --knowledge: the entries in its prompt, or NO_SOURCES when the message
    was answered without them (knowledge.Retrieval.grounded)."""
    return sources_line(used) or NO_SOURCES


# ----------------------------------------------------------------------------- history fitting

def fit_history(turns, style, count_tokens, budget):
    """Drop the oldest exchanges until the prompt fits `budget` tokens; cut an over-long newest message.

    `turns` alternate Patient / ChatDoctor and end with the newest patient message, which always stays,
    as do the instruction (and greeting). Returns (kept turns, notice or None).
    """
    start = 0
    while start < len(turns) - 1 and count_tokens(build_chat_prompt(turns[start:], style)) > budget:
        start += 2  # a whole exchange, so that the dialogue still starts with the patient
    kept = list(turns[start:])
    overflow = count_tokens(build_chat_prompt(kept, style)) - budget
    if overflow <= 0:
        return kept, None
    role, message = kept[-1]
    message_tokens = count_tokens(message)
    keep = message_tokens - overflow
    if keep < 1:
        return [], f"the instruction alone fills the {budget}-token budget; lower --max_new_tokens"
    while keep > 0:
        cut = cut_to_tokens(message, keep, count_tokens)
        if count_tokens(build_chat_prompt([(role, cut)], style)) <= budget:
            break
        keep -= max(1, keep // 50)
    notice = f"your message is too long for the model's context: only its first {keep} of {message_tokens} tokens are used"
    return [(role, cut)], notice


def cut_to_tokens(text, n_tokens, count_tokens):
    """The longest prefix of `text` (cut at a character) that has at most `n_tokens` tokens."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if count_tokens(text[:mid]) <= n_tokens:
            low = mid
        else:
            high = mid - 1
    return text[:low]


# ----------------------------------------------------------------------------- stops

def visible_answer(text):
    """(what of the generated `text` may be shown now, whether a stop string was reached).

    The answer is cut before a stop string; while the text might still become one ("...Pat"), and while
    it ends in whitespace (which a stop or the end would strip), that tail is held back.
    """
    text = text.lstrip()
    for stop in STOP_STRINGS:
        at = text.find(stop)
        if at >= 0:
            return text[:at].rstrip(), True
    held = 0
    for stop in STOP_STRINGS:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    text = text[: len(text) - held].rstrip("\ufffd")  # \ufffd: an unfinished multi-byte character
    return text.rstrip(), False


# ----------------------------------------------------------------------------- chat templates (serving engines)
# vLLM, TGI, llama.cpp and Ollama format a dialogue with the tokenizer's chat template. chat_template_for writes
# build_chat_prompt in Jinja, ollama_template in Go's template language, both from the constants above.
# Messages: "user" is the patient, "assistant" ChatDoctor. One leading "system" message takes the place of the
# instruction (leave it out for the prompt the model was trained with); any other role is refused. A final
# assistant message is an answer: alpaca renders prompt, answer and EOS, exactly a training record.
SPEAKERS = {"user": PATIENT, "assistant": DOCTOR}
ROLE_ERROR = ("ChatDoctor's chat template takes user (patient) and assistant (ChatDoctor) messages after at most "
              "one leading system message (it replaces the instruction); got role ")


def messages_of(turns, instruction=None):
    """build_chat_prompt's turns as chat messages (what a serving engine receives)."""
    roles = {speaker: role for role, speaker in SPEAKERS.items()}
    system = [{"role": "system", "content": instruction}] if instruction is not None else []
    return system + [{"role": roles[speaker], "content": text} for speaker, text in turns]


def string_literal(text):
    """A string literal of `text` in Jinja and in Go templates: JSON's escapes are theirs too."""
    return json.dumps(text)


def format_expression(template, fields, join=lambda parts: "(" + " + ".join(parts) + ")"):
    """`template.format(**fields)` as an expression of a template language: its text as string literals, each
    {field} the expression given, the parts joined by `join` (default: Jinja's +)."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts += [string_literal(literal)] if literal else []
        parts += [fields[field]] if field is not None else []
    return join(parts)


def jinja_format(template, **fields):
    return format_expression(template, fields)


def go_format(template, **fields):
    """`template.format(**fields)` as a Go template pipeline: print of its literals and the fields given."""
    return format_expression(template, fields, lambda parts: "(print " + " ".join(parts) + ")")


def split_response_header(template):
    """An Alpaca template as (the prompt up to its last field, the response header after it). The header is what
    a generation prompt adds: the answer follows it."""
    cut = template.rindex("}") + 1
    return template[:cut], template[cut:]


def chat_template_for(style):
    """The Jinja chat template whose rendering of messages with add_generation_prompt is build_chat_prompt(style)."""
    turn = lambda speaker, text: jinja_format(TURN, role=speaker, text=text)  # noqa: E731
    said = "speakers[message['role']]", "message['content']"
    lines = [
        "{%- set speakers = " + json.dumps(SPEAKERS) + " -%}",
        "{%- set has_system = messages|length > 0 and messages[0]['role'] == 'system' -%}",
        "{%- set instruction = messages[0]['content'] if has_system else " + string_literal(CHATDOCTOR_INSTRUCTION)
        + " -%}",
        "{%- set dialogue = messages[1:] if has_system else messages -%}",
        "{%- for message in dialogue -%}",
        "{%- if message['role'] not in speakers -%}{{- raise_exception(" + string_literal(ROLE_ERROR)
        + " + message['role']) -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- set answered = dialogue|length > 0 and dialogue[-1]['role'] == 'assistant' -%}",
    ]
    separator = string_literal(TURN_SEPARATOR)
    if style == "chatdoctor":
        lines += [
            "{%- set ns = namespace(history=" + turn(string_literal(DOCTOR), string_literal(GREETING)) + ") -%}",
            "{%- for message in dialogue -%}",
            "{%- set ns.history = ns.history + " + separator + " + " + turn(*said) + " -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt and not answered -%}",
            "{%- set ns.history = ns.history + " + separator + " + " + turn(string_literal(DOCTOR), '""') + " -%}",
            "{%- endif -%}",
            "{{- " + jinja_format(CHATDOCTOR_PROMPT, instruction="instruction", history="ns.history") + " -}}",
        ]
        return "\n".join(lines)
    with_input, input_header = split_response_header(PROMPT_DICT["prompt_input"])
    without_input, no_input_header = split_response_header(PROMPT_DICT["prompt_no_input"])
    lines += [
        "{%- set asked = dialogue[:-1] if answered else dialogue -%}",
        '{%- set ns = namespace(transcript="") -%}',
        "{%- for message in asked -%}",
        "{%- set ns.transcript = ns.transcript + (" + separator + ' if not loop.first else "") + ' + turn(*said)
        + " -%}",
        "{%- endfor -%}",
        "{%- set patient_input = asked[0]['content'] if asked|length == 1 else ns.transcript -%}",
        '{%- set header = ' + string_literal(no_input_header) + ' if patient_input == "" else '
        + string_literal(input_header) + " -%}",
        '{{- ' + jinja_format(without_input, instruction="instruction") + ' if patient_input == "" else '
        + jinja_format(with_input, instruction="instruction", input="patient_input") + " -}}",
        "{%- if answered -%}",
        "{{- header + dialogue[-1]['content'] + (eos_token if eos_token is defined else '') -}}",
        "{%- elif add_generation_prompt -%}{{- header -}}{%- endif -%}",
    ]
    return "\n".join(lines)


def ollama_template(style):
    """build_chat_prompt in Ollama's Go template syntax, over .Messages: a system message replaces the
    instruction, user is the patient, assistant ChatDoctor (as chat_template_for)."""
    turn = lambda speaker: go_format(TURN, role=speaker, text=".Content")  # noqa: E731
    lines = [
        "{{- $instruction := " + string_literal(CHATDOCTOR_INSTRUCTION) + " }}",
        "{{- $history := " + go_format(TURN, role=string_literal(DOCTOR), text=string_literal(GREETING)) + " }}",
        '{{- $transcript := "" }}{{- $first := "" }}{{- $turns := 0 }}{{- $last := "" }}',
        "{{- range .Messages }}",
        '{{- if eq .Role "system" }}{{- $instruction = .Content }}',
        "{{- else }}",
        "{{- $speaker := " + string_literal(DOCTOR) + ' }}{{- if eq .Role "user" }}{{- $speaker = '
        + string_literal(PATIENT) + " }}{{- end }}",
        "{{- $history = print $history " + string_literal(TURN_SEPARATOR) + " " + turn("$speaker") + " }}",
        "{{- if $turns }}{{- $transcript = print $transcript " + string_literal(TURN_SEPARATOR) + " " + turn("$speaker")
        + " }}{{- $turns = 2 }}",
        "{{- else }}{{- $transcript = " + turn("$speaker") + " }}{{- $first = .Content }}{{- $turns = 1 }}{{- end }}",
        "{{- $last = .Role }}",
        "{{- end }}",
        "{{- end }}",
    ]
    if style == "chatdoctor":
        lines += [
            '{{- if ne $last "assistant" }}{{- $history = print $history ' + string_literal(TURN_SEPARATOR) + " "
            + go_format(TURN, role=string_literal(DOCTOR), text='""') + " }}{{- end }}",
            "{{- " + go_format(CHATDOCTOR_PROMPT, instruction="$instruction", history="$history") + " }}",
        ]
        return "\n".join(lines)
    with_input, input_header = split_response_header(PROMPT_DICT["prompt_input"])
    without_input, no_input_header = split_response_header(PROMPT_DICT["prompt_no_input"])
    lines += [
        "{{- $input := $transcript }}{{- if eq $turns 1 }}{{- $input = $first }}{{- end }}",
        '{{- if eq $input "" }}{{- ' + go_format(without_input, instruction="$instruction") + " }}{{- "
        + string_literal(no_input_header) + " }}",
        "{{- else }}{{- " + go_format(with_input, instruction="$instruction", input="$input") + " }}{{- "
        + string_literal(input_header) + " }}{{- end }}",
    ]
    return "\n".join(lines)
