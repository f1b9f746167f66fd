"""ChatDoctor in the terminal: a doctor dialogue with a fine-tuned causal language model.

    python chat.py                                           # ./pretrained, interactive
    python chat.py --model_path models/SmolLM2-135M-Instruct # any local Hugging Face causal-LM folder
    python chat.py --prompt "I have a rash and a fever"      # one answer, only the answer on stdout
    printf 'first question\\nsecond question\\n' | python chat.py  # one turn per line, one answer each
    python chat.py --greedy --prompt_style chatdoctor        # deterministic, the original prompt text
    python chat.py --knowledge format_dataset.csv            # answers grounded in the disease database, with sources

In the dialogue: /reset starts a new conversation, /help lists the commands, /exit (or Ctrl-D) quits.
Ctrl-C stops an answer; at the prompt it quits.

The dialogue's text (prompt, turns, stops, history fitting, knowledge block) is prompts.py's. This file holds the
dialogue engine (Chat: history, KV cache, streaming, grounding, the emergency notice; Engine: the model, tokenizer
and knowledge base that conversations share, made from EngineSettings) and the terminal around it; app.py and
eval.py use the engine.
"""
import argparse
import errno
import importlib.util
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Optional

from prompts import (DEFAULT_PROMPT_STYLE, DOCTOR, GREETING, PATIENT, PROMPT_STYLES, SAFETY_NOTICE, STOP_STRINGS,
                     answer_sources_line, build_chat_prompt, fit_history, format_context, grounded_message,
                     next_turn_prefix, visible_answer)
from utils import DataError, ModelLoadError, fail, first_line, load_model, load_tokenizer, prompt_style_for
from utils import terminal_safe

DEFAULT_GENERATION = {"repetition_penalty": 1.1, "max_new_tokens": 200}  # the original chat.py's

# Emergency signs: (what it is, patterns that must ALL appear somewhere in the message).
# Matching is case-insensitive and deliberately generous: a needless notice costs a line, a missed one more.
CHEST_PAIN = r"chest (pain|tightness|pressure|hurts)|pain in (my|the|his|her) chest|crushing pain"
BREATHLESS = r"short(ness)? of breath|breathless|can'?not breathe|can'?t (breathe|catch my breath)|(difficulty|trouble|struggling) breathing"
RED_FLAGS = [
    ("chest pain with breathlessness", (CHEST_PAIN, BREATHLESS)),
    ("chest pain spreading to the arm, jaw or back", (CHEST_PAIN, r"\b(arm|jaw|back|neck)\b")),
    ("signs of a stroke", (r"fac(e|ial) (is )?droop|droop(y|ing) (face|mouth)|slurred speech|can'?t (speak|talk) properly"
                           r"|sudden (weakness|numbness|confusion)|one side of (my|his|her|the) (body|face)",)),
    ("suicidal thoughts", (r"suicid|kill (myself|himself|herself)|end (my|his|her) life|want to die|self[- ]harm"
                           r"|hurt(ing)? myself|no reason to live",)),
    ("severe bleeding", (r"(heavy|severe|uncontrolled|massive|profuse) bleeding|bleeding (heavily|profusely|a lot)"
                         r"|bleeding (that )?(won'?t|will not|doesn'?t) stop|(vomiting|coughing up|throwing up) blood",)),
    ("anaphylaxis", (r"anaphyla|throat (is )?(swelling|closing|tight)|swollen (throat|tongue)|tongue (is )?swelling"
                     r"|(allergic reaction|allergy|bee sting|peanut).*(breath|swell)",)),
    ("unconsciousness or a seizure", (r"unconscious|unresponsive|not breathing|stopped breathing|passed out"
                                      r"|seizure|convulsion|fitting",)),
    ("poisoning or overdose", (r"overdose|poison|swallowed (bleach|pills)|took too many (pills|tablets)",)),
    ("sudden worst-ever headache", (r"worst headache|thunderclap|sudden (severe|terrible|excruciating) headache",)),
]
EMERGENCY_NOTICE = (
    "! This may be an emergency ({signs}). Call your local emergency number (112 / 911 / 999) "
    "or go to the nearest emergency department now; do not wait for this chat."
)
HELP = """Commands:
  /reset   start a new conversation (forget the history)
  /sources the knowledge entries retrieved for the last message, with their scores (--knowledge)
  /help    show this help
  /exit    quit (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while ChatDoctor answers stops that answer; the exchange is then forgotten.
Anything else is your message to ChatDoctor."""


# ----------------------------------------------------------------------------- safety

def red_flags(message):
    """The names of the emergency signs in RED_FLAGS that `message` mentions."""
    text = message.lower()
    return [name for name, patterns in RED_FLAGS if all(re.search(p, text) for p in patterns)]


def emergency_notice(message):
    found = red_flags(message)
    return EMERGENCY_NOTICE.format(signs="; ".join(found)) if found else None


# ----------------------------------------------------------------------------- device and model

def available_devices():
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def pick_device(requested, available):
    """'auto' -> cuda, else mps, else cpu. An explicit device must exist here."""
    if requested == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if d in available)
    if requested.split(":")[0] not in available:
        raise ModelLoadError(f"--device {requested}: not available here (available: {', '.join(available)})")
    return requested


def pick_dtype(requested, device, bf16_supported=False):
    """'auto' -> bfloat16 on CUDA that has it, float16 on other GPUs, float32 on CPU."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if bf16_supported else "float16"
    return "float16" if device == "mps" else "float32"


def quantization_config(settings, device):
    """bitsandbytes 8/4-bit settings for --load_in_8bit / --load_in_4bit (CUDA only), else None."""
    if not (settings.load_in_8bit or settings.load_in_4bit):
        return None
    flag = "--load_in_8bit" if settings.load_in_8bit else "--load_in_4bit"
    if not device.startswith("cuda"):
        raise ModelLoadError(f"{flag} needs a CUDA GPU (bitsandbytes); this run is on {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"{flag} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=settings.load_in_8bit, load_in_4bit=settings.load_in_4bit)


def load_chat_model(settings):
    """(model, tokenizer, device, dtype name) for EngineSettings; ModelLoadError on any problem."""
    import torch

    device = pick_device(settings.device, available_devices())
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    dtype = pick_dtype(settings.dtype, device, bf16)
    quantization = quantization_config(settings, device)
    tokenizer = load_tokenizer(settings.model_path)
    if quantization is not None:
        model = load_model(settings.model_path, dtype=getattr(torch, dtype), quantization_config=quantization,
                           device_map={"": device})
    else:
        model = load_model(settings.model_path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    if device == "cpu":
        split_cpu_gemv(model)
    return model, tokenizer, device, dtype


def split_cpu_gemv(model, parts=None):
    """Decode on CPU: a one-row matmul (one new token) can read its weight far below the memory bandwidth (BLAS
    may run it on one thread). As a batched matmul over `parts` row blocks of the weight it runs on all threads;
    docs/BENCHMARKS.md#chat measures both rates on the machine it ran on. Prompt encoding (many rows) and
    anything with gradients keep nn.Linear. Returns how many layers were switched."""
    import torch

    parts = parts or torch.get_num_threads()
    if parts < 2:
        return 0
    switched = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and module.bias is None and module.weight.dtype == torch.float32
                and module.weight.device.type == "cpu" and module.out_features % parts == 0):
            module.forward = _blocked_gemv_forward(module, parts)
            switched += 1
    return switched


def _blocked_gemv_forward(linear, parts):
    import torch

    plain, rows, cols = linear.forward, linear.out_features, linear.in_features

    def forward(x):
        if x.numel() != cols or torch.is_grad_enabled() or not linear.weight.is_contiguous():
            return plain(x)
        blocks = linear.weight.view(parts, rows // parts, cols)
        # a (cols, 1) column with row stride 1: the layout MKL's batched kernel is fast for
        column = x.reshape(1, cols).t().expand(parts, cols, 1)
        return torch.bmm(blocks, column).reshape(*x.shape[:-1], rows)

    return forward


COMPILED_CONTEXT = 1024  # --compile: the static cache every decoded token attends over in full


def compile_decoding(model):
    """--compile: generate() runs each decoding step as one torch.compile'd graph over a static cache, which
    removes most of PyTorch's per-op cost (the per-token floor docs/BENCHMARKS.md#chat measures). Compiling
    takes a while on the first answer; torch caches the result on disk for later runs."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # private: generate() compiles only on GPUs unless told (docs/PRIVATE_API.md)
    model.generation_config.compile_config = config
    model.generation_config.disable_compile = False


def context_window(model, tokenizer):
    sizes = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    sizes = [s for s in sizes if isinstance(s, int) and 0 < s < 1_000_000]
    return min(sizes) if sizes else 2048


# ----------------------------------------------------------------------------- generation

class AnswerStreamer:
    """Receives tokens from generate(), shows the answer as it grows (nothing past a stop string),
    and tells the stopping criterion when a stop string has appeared."""

    def __init__(self, tokenizer, on_text=None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids, self.shown, self.stopped, self.prompt_seen = [], "", False, False
        self.first_token_at = None

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self.show(self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def show(self, text):
        """The answer generated so far is `text`: pass on what of it is newly visible."""
        self.first_token_at = self.first_token_at or time.perf_counter()
        visible, self.stopped = visible_answer(text)
        if visible.startswith(self.shown) and len(visible) > len(self.shown):
            if self.on_text is not None:
                self.on_text(visible[len(self.shown):])
            self.shown = visible

    def end(self):
        pass

    def __call__(self, input_ids, scores, **kwargs):  # as a StoppingCriteria
        import torch

        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


def common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Chat:
    """One conversation: its history, and a KV cache that holds the tokens all later prompts start with.

    Each turn the cache is cut back to the longest prefix it shares with the new prompt and only the rest
    is encoded; after an answer the next turn's fixed prefix is encoded at once, so that the next turn
    only has to encode the patient's new message (reuse_cache=False re-encodes everything, for comparison).
    """

    def __init__(self, model, tokenizer, style=DEFAULT_PROMPT_STYLE, generation=None, context=None,
                 reuse_cache=True, static_cache=False, knowledge=None, k=None):
        self.model, self.tokenizer, self.style = model, tokenizer, style
        self.knowledge, self.k = knowledge, k  # a knowledge.KnowledgeBase: each message is grounded in its entries
        self.last_hits, self.last_retrieval = [], None  # the entries in the last prompt; all that was found
        self.context = context or context_window(model, tokenizer)
        # A static cache has a fixed size (what compiled decoding needs); every step attends over all of it.
        self.static_cache = static_cache
        self.set_generation(generation)
        self.reuse_cache = reuse_cache
        self.turns, self.stats = [], {}
        self.reset()

    def set_generation(self, generation):
        """The sampling settings and answer length (generation_settings) of the next answers; the history and
        the cache stay. ValueError when the answer length leaves no room for a prompt."""
        generation = dict(generation or {"do_sample": False})
        max_new_tokens = generation.pop("max_new_tokens", 200)
        budget = self.context - max_new_tokens
        if self.count_tokens(build_chat_prompt([(PATIENT, "")], self.style)) >= budget:
            raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for the prompt in the "
                             f"{self.context}-token context window")
        self.generation, self.max_new_tokens, self.budget = generation, max_new_tokens, budget

    def reset(self):
        self.turns, self.last_hits, self.last_retrieval = [], [], None
        self.drop_cache()

    def drop_cache(self):
        self.cache, self.cached_ids = None, []

    def count_tokens(self, text):
        return len(self.tokenizer(text)["input_ids"])

    def encode(self, text):
        return self.tokenizer(text)["input_ids"]

    def respond(self, message, on_text=None, on_notice=None):
        """Generate the answer to `message`, streaming it to on_text(chunk); returns the stripped answer."""
        start = time.perf_counter()
        shown_message = self.ground(message)
        retrieved = time.perf_counter()
        turns, notice = fit_history(self.turns + [(PATIENT, shown_message)], self.style, self.count_tokens,
                                    self.budget)
        if not turns:
            raise ValueError(notice)
        if notice and on_notice is not None:
            on_notice(notice)
        prompt = build_chat_prompt(turns, self.style)
        ids = self.encode(prompt)
        if not self.reuse_cache:
            self.drop_cache()
        try:
            answer, streamer = self.generate(prompt, ids, on_text)
        except BaseException:  # Ctrl-C mid-step can leave layers of the cache at different lengths
            self.drop_cache()
            raise
        answered = time.perf_counter()
        # The history keeps what the patient said; retrieved entries go only with the newest message, so the
        # prompt of the next turn starts with this one's and the KV cache still serves it.
        said = (PATIENT, message) if self.last_hits and not notice else turns[-1]
        self.turns = turns[:-1] + [said, (DOCTOR, answer)]
        if self.reuse_cache:
            self.fill_cache(self.encode(next_turn_prefix(self.turns, self.style)))
        self.stats = {"prompt_tokens": len(ids), "new_tokens": len(streamer.ids),
                      "first_token_s": (streamer.first_token_at or answered) - start, "answer_s": answered - start,
                      "next_prefix_s": time.perf_counter() - answered, "retrieval_s": retrieved - start}
        return answer

    def ground(self, message):
        """`message` with the knowledge entries retrieved for it: unchanged without --knowledge, or when the message
        does not describe symptoms or ask what is wrong (knowledge.Retrieval.grounded; /sources still lists what was
        found and why it was left out)."""
        if self.knowledge is None:
            return message
        import knowledge

        self.last_retrieval = self.knowledge.retrieve(message, self.k or knowledge.DEFAULT_K)
        self.last_hits = self.last_retrieval.used
        return grounded_message(message, format_context(self.last_hits)) if self.last_hits else message

    def respond_all(self, messages):
        return [self.respond(m) for m in messages]

    def generate(self, prompt, ids, on_text):
        """(the visible answer to `prompt`, whose tokens are `ids`; its streamer), streamed to on_text."""
        import torch

        self.fill_cache(ids[:-1])  # generate() then encodes only the last prompt token
        streamer = AnswerStreamer(self.tokenizer, on_text)
        input_ids = torch.tensor([ids], device=self.model.device)
        eos = [t for t in {self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id} if t is not None]
        with torch.no_grad():
            output = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), cache=self.cache, streamer=streamer,
                stopping_criteria=[streamer], max_new_tokens=min(self.max_new_tokens, self.context - len(ids)),
                eos_token_id=eos, pad_token_id=self.pad_token_id(eos), **self.generation,
            )
        self.cached_ids = output[0, : self.cache.get_seq_length()].tolist()
        text = self.tokenizer.decode(streamer.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return visible_answer(text + "\n")[0], streamer  # "\n": nothing is held back any more

    def pad_token_id(self, eos):
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else eos[0]

    def new_cache(self):
        from transformers import DynamicCache, StaticCache

        if self.static_cache:
            return StaticCache(config=self.model.config, max_cache_len=self.context)
        return DynamicCache(config=self.model.config)

    def fill_cache(self, ids):
        """Make the cache hold exactly `ids`, encoding only what it does not already hold."""
        import torch

        keep = common_prefix_length(self.cached_ids, ids)
        if self.cache is None or keep == 0:
            self.cache, self.cached_ids, keep = self.new_cache(), [], 0
        elif keep < self.cache.get_seq_length():
            self.cache.crop(keep - self.cache.get_seq_length())
        new = ids[keep:]
        if new:
            with torch.no_grad():
                self.model(input_ids=torch.tensor([new], device=self.model.device), cache=self.cache,
                           use_cache=True, logits_to_keep=1)
        self.cached_ids = list(ids)


# ----------------------------------------------------------------------------- a serving engine instead of the model

# Without the model's tokenizer, a token is counted for every 3 bytes of UTF-8: SmolLM2's tokenizer averages 4.7
# bytes a token over the held-out GenMedGPT questions and answers (2.6 in the densest one), so the count mostly runs
# high and history fitting keeps a little less than would fit. A prompt the engine still finds too long is refused
# by it with one line, and the dialogue goes on.
BYTES_PER_TOKEN = 3


class ApproximateTokenizer:
    """Token counts for history fitting when no tokenizer of the served model is at hand (see BYTES_PER_TOKEN)."""

    def __call__(self, text):
        return {"input_ids": [0] * -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)}


def engine_request(generation):
    """generate()'s settings (GenerationSettings.generate_kwargs) as a completions request's. Greedy is temperature
    0. top_k, min_p and llama.cpp's name of the repetition penalty go in the body, where vLLM, SGLang and llama.cpp
    read them (OpenAI's API has neither); min_p 0 turns off llama.cpp's default 0.05, which generate() does not have."""
    sampled = generation.get("do_sample", False)
    penalty = generation.get("repetition_penalty", 1.0)
    return {"temperature": generation.get("temperature", 1.0) if sampled else 0.0,
            "top_p": generation.get("top_p", 1.0) if sampled else 1.0, "repetition_penalty": penalty,
            "extra_body": {"top_k": generation.get("top_k", 0) if sampled else 0, "min_p": 0.0,
                           "repeat_penalty": penalty}}


class BackendChat(Chat):
    """A Chat whose answers come from a serving engine (backend.Backend) through the completions API: the same
    prompt, history fitting, grounding, stops and streaming as in-process. The engine keeps its own prefix cache
    (llama.cpp and vLLM reuse the prompt a request shares with earlier ones), so nothing is cached here."""

    def __init__(self, backend, tokenizer, style, generation, context, knowledge=None, k=None, seed=None):
        self.backend, self.seed = backend, seed
        super().__init__(None, tokenizer, style, generation, context=context, reuse_cache=False, knowledge=knowledge,
                         k=k)

    def generate(self, prompt, ids, on_text):
        streamer = AnswerStreamer(None, on_text)
        pieces = self.backend.stream(prompt, max_tokens=min(self.max_new_tokens, self.context - len(ids)),
                                     stop=list(STOP_STRINGS), seed=self.seed, **engine_request(self.generation))
        text = ""
        try:
            for piece in pieces:
                text += piece
                streamer.show(text)
                if streamer.stopped:
                    break
        finally:
            pieces.close()  # a stopped or abandoned answer: the engine stops generating it too
        streamer.ids = self.encode(text)
        return visible_answer(text + "\n")[0], streamer


class OriginalPipelineChat:
    """The released autonomous ChatDoctor (Autonomous_ChatDoctor_csv): per message, the model extracts keywords,
    the table chunks with most keyword hits are answered one by one, and a last call picks the best answer.
    No history, no cache: up to six model calls a message (knowledge.original_answer)."""

    def __init__(self, model, tokenizer, csv_path, generation):
        import knowledge

        self.model, self.tokenizer = model, tokenizer
        self.chunks = knowledge.original_chunks(csv_path)
        self.set_generation(generation)
        self.last_hits, self.last_turn, self.stats = [], None, {}

    def set_generation(self, generation):
        self.generation = {**generation, "max_new_tokens": generation.get("max_new_tokens", 200)}

    def reset(self):
        self.last_turn = None

    def complete(self, prompt):
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**ids, eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id or eos,
                                      **self.generation)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    def respond(self, message, on_text=None, on_notice=None):
        import knowledge

        self.last_turn = knowledge.original_answer(message, self.complete, self.chunks)
        answer = visible_answer(self.last_turn.answer + "\n")[0]
        if on_text is not None:
            on_text(answer)
        self.stats = {"model_calls": self.last_turn.model_calls}
        return answer


class BackendOriginalPipelineChat(OriginalPipelineChat):
    """The released autonomous pipeline with each of its model calls answered by a serving engine."""

    def __init__(self, backend, csv_path, generation, seed=None):
        self.backend, self.seed = backend, seed
        super().__init__(None, None, csv_path, generation)

    def complete(self, prompt):
        settings = dict(self.generation)
        max_tokens = settings.pop("max_new_tokens")
        return self.backend.complete(prompt, max_tokens=max_tokens, seed=self.seed, **engine_request(settings)).text


# ----------------------------------------------------------------------------- settings and the engine
# What every conversation shares, loaded once; app.py makes one Chat per browser tab from the same Engine.

def quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated (chat.py's generation flags, app.py's settings panel)."""
    greedy: bool = False
    temperature: float = 0.5
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = DEFAULT_GENERATION["repetition_penalty"]
    max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"]

    def check(self):
        """ValueError naming the flags when a setting is out of range."""
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("need --temperature >= 0, --top_k >= 0, 0 < --top_p <= 1, --repetition_penalty > 0")
        if self.max_new_tokens < 1:
            raise ValueError("--max_new_tokens must be at least 1")
        return self

    def generate_kwargs(self):
        """The settings as generate() takes them; temperature 0 means greedy."""
        settings = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.greedy or self.temperature == 0:
            return {**settings, "do_sample": False}
        return {**settings, "do_sample": True, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p}


@dataclass(frozen=True)
class EngineSettings:
    """What every conversation shares: the model, its prompt style, the knowledge, the hardware."""
    model_path: str = "./pretrained"
    prompt_style: Optional[str] = None  # None: the style recorded in the model folder (utils.prompt_style_for)
    knowledge: Optional[str] = None
    knowledge_k: Optional[int] = None
    knowledge_mode: str = "grounded"
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    seed: Optional[int] = None
    # A serving engine (OpenAI-compatible URL) answers instead of the model in model_path, which then gives only
    # the tokenizer (token counts for history fitting), the recorded prompt style and the context size.
    backend: Optional[str] = None
    model: Optional[str] = None  # the engine's name of the model; None: the first it serves
    backend_timeout: float = 120.0
    backend_retries: int = 3
    backend_context: int = 2048  # tokens the engine holds per request (llama.cpp's --n_ctx, vLLM's --max-model-len)


def settings_from(args, settings_class):
    """The fields of `settings_class` taken from parsed arguments."""
    return settings_class(**{f.name: getattr(args, f.name) for f in fields(settings_class)})


@dataclass
class Engine:
    """The model, tokenizer and knowledge base, loaded once; every conversation (new_chat) shares them."""
    settings: EngineSettings
    model: object
    tokenizer: object
    knowledge_base: object = None
    where: str = ""  # the line that names the model and where it runs
    backend: object = None  # a backend.Backend answering in place of `model`
    context: Optional[int] = None  # with a backend: the tokens a request may hold

    def new_chat(self, generation):
        """A new conversation answering with `generation` (GenerationSettings)."""
        s, kwargs = self.settings, generation.generate_kwargs()
        if self.backend is not None:
            if s.knowledge_mode == "original":
                return BackendOriginalPipelineChat(self.backend, s.knowledge, kwargs, s.seed)
            return BackendChat(self.backend, self.tokenizer, s.prompt_style, kwargs, self.context,
                               knowledge=self.knowledge_base, k=s.knowledge_k, seed=s.seed)
        if s.knowledge_mode == "original":
            return OriginalPipelineChat(self.model, self.tokenizer, s.knowledge, kwargs)
        grounding = {"knowledge": self.knowledge_base, "k": s.knowledge_k}
        if not s.compile:
            return Chat(self.model, self.tokenizer, s.prompt_style, kwargs, **grounding)
        compile_decoding(self.model)
        context = min(context_window(self.model, self.tokenizer), COMPILED_CONTEXT)
        return Chat(self.model, self.tokenizer, s.prompt_style, kwargs, context=context, static_cache=True,
                    **grounding)


def load_knowledge_base(settings, info):
    if not settings.knowledge or settings.knowledge_mode == "original":
        return None
    import knowledge

    started = time.perf_counter()
    base = knowledge.load_knowledge(settings.knowledge)
    say(f"(knowledge: {len(base)} entries from {settings.knowledge}, index {'built' if base.built else 'cached'} in "
        f"{time.perf_counter() - started:.1f} s)", info)
    return base


def load_engine(settings, info):
    """The Engine of `settings` (EngineSettings), progress on `info`; its settings name the prompt style used."""
    quiet_libraries()
    if settings.backend:
        return connect_engine(settings, info)
    say(f"Loading {settings.model_path} ...", info)
    settings = replace(settings, prompt_style=prompt_style_for(settings.model_path, settings.prompt_style))
    model, tokenizer, device, dtype = load_chat_model(settings)
    if settings.seed is not None:
        from transformers import set_seed

        set_seed(settings.seed)
    knowledge_base = load_knowledge_base(settings, info)
    where = (f"{settings.model_path} · {device} {dtype} · prompt {settings.prompt_style}"
             f"{' · compiled decoding' if settings.compile else ''}")
    return Engine(settings, model, tokenizer, knowledge_base, where)


def local_tokenizer(settings):
    """(tokenizer, what counts the tokens) of a --backend run: model_path's tokenizer when that model folder is here
    (the engine serves an export of it, so the counts are the engine's), else ApproximateTokenizer."""
    from utils import check_model_path

    try:
        check_model_path(settings.model_path, local=True)
    except ModelLoadError:
        return ApproximateTokenizer(), f"tokens estimated at {BYTES_PER_TOKEN} bytes each (no model folder here)"
    return load_tokenizer(settings.model_path), f"tokens counted by {settings.model_path}'s tokenizer"


def connect_engine(settings, info):
    """The Engine of a --backend run: a client of the serving engine, the tokenizer, the knowledge base. An engine
    that does not answer yet is reported and not waited for (each answer tries it again); without --model its
    name must come from the engine."""
    from backend import Backend, BackendError

    say(f"Connecting to {settings.backend} ...", info)
    server = Backend(settings.backend, settings.model, timeout=settings.backend_timeout,
                     retries=settings.backend_retries)
    try:
        served = server.models()
    except BackendError as e:
        if not settings.model:
            raise ValueError(f"{e} (and no --model NAME to ask it for)") from None
        say(f"(the engine does not answer yet: {e}; each message tries it again)", info)
        served = []
    if not settings.model:
        if not served:
            raise ValueError(f"{settings.backend}: serves no model")
        server.model = served[0]
    elif served and settings.model not in served:
        say(f"(the engine serves {', '.join(served)}, not {settings.model}: it may answer with another model)", info)
    settings = replace(settings, model=server.model,
                       prompt_style=prompt_style_for(settings.model_path, settings.prompt_style))
    tokenizer, counted = local_tokenizer(settings)
    knowledge_base = load_knowledge_base(settings, info)
    where = f"{server.model} at {settings.backend} · prompt {settings.prompt_style} · {counted}"
    return Engine(settings, None, tokenizer, knowledge_base, where, backend=server, context=settings.backend_context)


# ----------------------------------------------------------------------------- the three ways to talk

def say(text, stream):
    print(text, file=stream, flush=True)


def stream_to(stream):
    return lambda chunk: print(terminal_safe(chunk), end="", file=stream, flush=True)


ENGINE_FAILED = "error: {error} (this message got no answer; send it again once the engine is back)"


def engine_failed(error):
    """Whether `error` is a serving engine's (backend.BackendError): that answer failed, the dialogue goes on."""
    return "backend" in sys.modules and isinstance(error, sys.modules["backend"].BackendError)


def answer_once(chat, message, out, info, prefix=""):
    """The emergency notice (if any) on `info`, then `prefix` and the streamed answer on `out`."""
    notice = emergency_notice(message)
    if notice:
        say(notice, info)
    print(prefix, end="", file=out, flush=True)

    def trimmed(note):  # over the prefix already shown, which is then shown again
        say(f"\r({note})", info)
        print(prefix, end="", file=out, flush=True)

    chat.respond(message, on_text=stream_to(out), on_notice=trimmed)
    if getattr(chat, "last_retrieval", None) is not None:
        print(f"\n{terminal_safe(answer_sources_line(chat.last_hits), one_line=True)}", end="", file=out, flush=True)


def sources_table(retrieval):
    """/sources: the entries found for the last message, with their scores, and whether they went into the prompt."""
    if retrieval is None or not retrieval.hits:
        return "(no knowledge entries retrieved yet: start with --knowledge and ask a question)"
    rows = [terminal_safe(f"{rank}. {entry.id} {entry.title} (score {score:.3f}; {entry.source})", one_line=True)
            for rank, (entry, score) in enumerate(retrieval.hits, 1)]
    return "\n".join(rows + [f"({retrieval.reason()})"])


def run_command(chat, command, out, info):
    """The slash commands the terminal and piped input share: /sources (its table on `out`), /help, and an
    unknown command (a notice on `info`). True when `command` was one of them."""
    if command == "/sources":
        say(sources_table(getattr(chat, "last_retrieval", None)), out)
    elif command == "/help":
        say(HELP, info)
    elif command.startswith("/") and " " not in command:
        say(f"unknown command {command}; /help lists the commands", info)
    else:
        return False
    return True


def run_interactive(chat):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    say(f"{DOCTOR}: {GREETING}", sys.stdout)
    while True:
        try:
            line = input(f"{PATIENT}: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            chat.reset()
            say(f"(new conversation)\n{DOCTOR}: {GREETING}", sys.stdout)
            continue
        if run_command(chat, command, sys.stdout, sys.stdout):
            continue
        print()
        try:
            answer_once(chat, command, sys.stdout, sys.stdout, prefix=f"{DOCTOR}: ")
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except Exception as e:
            if not engine_failed(e):
                raise
            print(f"\n{ENGINE_FAILED.format(error=e)}", end="")
        print("\n")


def decoded_lines(stream, encoding, info):
    """The lines of the byte `stream` as text; a line with bytes that are not `encoding` is still answered,
    with those bytes replaced by U+FFFD and a notice on `info`."""
    for number, raw in enumerate(stream, 1):
        try:
            yield raw.decode(encoding)
        except UnicodeDecodeError as e:
            say(f"(input line {number} is not valid {encoding} at byte {e.start}: "
                f"the bytes that are not text are replaced by U+FFFD)", info)
            yield raw.decode(encoding, errors="replace")


def run_lines(chat, lines):
    """Piped stdin: each non-empty line is a patient turn of one conversation; each answer on its own line.
    The terminal's commands work here too (/sources prints its table on stdout, /help on stderr). Exit code 1 when
    the serving engine failed an answer (that line stays empty; the next messages are still tried)."""
    failed = 0
    for line in lines:
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            chat.reset()
            continue
        if run_command(chat, message, sys.stdout, sys.stderr):
            continue
        try:
            answer_once(chat, message, sys.stdout, sys.stderr)
        except Exception as e:
            if not engine_failed(e):
                raise
            say(ENGINE_FAILED.format(error=e), sys.stderr)
            failed = 1
        print(flush=True)  # one line on stdout for every message, answered or not
    return failed


# ----------------------------------------------------------------------------- command line

def argument_parser(description="Talk to ChatDoctor in the terminal.", one_shot=True):
    """The model, prompt, knowledge, generation and hardware options (app.py adds its own to them);
    `one_shot`: also --prompt, the terminal's one-answer mode."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", default="./pretrained", help="local Hugging Face causal-LM folder")
    if one_shot:
        p.add_argument("--prompt", help="answer this one message, print only the answer, and exit")
    p.add_argument("--prompt_style", choices=PROMPT_STYLES, default=None,
                   help="chatdoctor: the original chat prompt; alpaca: the training template. Default: the style "
                        f"recorded by train.py in the model folder, else {DEFAULT_PROMPT_STYLE}")
    k = p.add_argument_group("knowledge (answers grounded in retrieved entries, with their sources)")
    k.add_argument("--knowledge", metavar="PATH[,PATH...]",
                   help="disease CSV(s) like format_dataset.csv, JSONL of {title, text}, or folders of .txt/.md")
    k.add_argument("--knowledge_k", type=int, default=None, help="entries per message (default: knowledge.DEFAULT_K)")
    k.add_argument("--knowledge_mode", choices=("grounded", "original"), default="grounded",
                   help="original: the released autonomous ChatDoctor pipeline (keywords, 4 table chunks, best answer)")
    g = p.add_argument_group("generation (sampling defaults are the original chat.py's)")
    g.add_argument("--temperature", type=float, default=0.5, help="0 means --greedy")
    g.add_argument("--top_k", type=int, default=50)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--repetition_penalty", type=float, default=DEFAULT_GENERATION["repetition_penalty"])
    g.add_argument("--max_new_tokens", type=int, default=DEFAULT_GENERATION["max_new_tokens"])
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    g.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    e = p.add_argument_group("serving engine (vLLM, llama.cpp, Ollama, ... answers instead of the model in-process)")
    e.add_argument("--backend", metavar="URL", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 (key, "
                   "if it needs one: $OPENAI_API_KEY); --model_path then gives only the tokenizer and prompt style")
    e.add_argument("--model", metavar="NAME", help="the engine's name of the model (default: the first it serves)")
    e.add_argument("--backend_timeout", type=float, default=EngineSettings.backend_timeout,
                   help="seconds to wait for the engine (for a streamed answer: between two pieces)")
    e.add_argument("--backend_retries", type=int, default=EngineSettings.backend_retries,
                   help="tries again after a refused, dropped or timed-out request (before the answer's first piece)")
    e.add_argument("--backend_context", type=int, default=EngineSettings.backend_context,
                   help="tokens the engine holds per request (llama.cpp --n_ctx, vLLM --max-model-len)")
    h = p.add_argument_group("hardware")
    h.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    h.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    h.add_argument("--compile", action="store_true",
                   help=f"compile the decoding step (faster tokens; about a minute on the first answer; history "
                        f"limited to {COMPILED_CONTEXT} tokens)")
    q = h.add_mutually_exclusive_group()
    q.add_argument("--load_in_8bit", action="store_true", help="8-bit weights via bitsandbytes (CUDA)")
    q.add_argument("--load_in_4bit", action="store_true", help="4-bit weights via bitsandbytes (CUDA)")
    return p


def parse_args(argv=None, parser=None):
    """The parsed and checked options of `parser` (default: chat.py's own argument_parser())."""
    p = parser or argument_parser()
    args = p.parse_args(argv)
    try:
        settings_from(args, GenerationSettings).check()
    except ValueError as e:
        p.error(str(e))
    args.greedy = args.greedy or args.temperature == 0
    if args.knowledge_k is not None and args.knowledge_k < 1:
        p.error("--knowledge_k must be at least 1")
    if args.knowledge_mode == "original" and not args.knowledge:
        p.error("--knowledge_mode original needs --knowledge (a disease CSV)")
    if args.backend_timeout <= 0 or args.backend_retries < 0 or args.backend_context < 2:
        p.error("need --backend_timeout > 0, --backend_retries >= 0 and --backend_context >= 2")
    if args.backend and not args.backend.startswith(("http://", "https://")):
        p.error(f"--backend {args.backend}: not an http(s) URL (e.g. http://127.0.0.1:8080/v1)")
    if args.model and not args.backend:
        p.error("--model names a model of a serving engine: give its --backend URL (else --model_path)")
    return args


def argv_text(value):
    """`value` from the command line with any bytes that are not text as U+FFFD (Python hands them over as
    lone surrogates, which the tokenizer refuses)."""
    return os.fsencode(value).decode(sys.getfilesystemencoding(), errors="replace")


def main(argv=None):
    args = parse_args(argv)
    interactive = args.prompt is None and sys.stdin.isatty()
    info = sys.stdout if interactive else sys.stderr  # one-shot and piped runs keep stdout for answers
    try:
        engine = load_engine(settings_from(args, EngineSettings), info)
        chat = engine.new_chat(settings_from(args, GenerationSettings))
        say(f"[{engine.where}] {SAFETY_NOTICE}", info)
        if args.compile:
            say("(the first answer compiles the model: about a minute)", info)
        if args.prompt is not None:
            return run_lines(chat, [argv_text(args.prompt).replace("\n", " ")])
        if not interactive:
            return run_lines(chat, decoded_lines(sys.stdin.buffer, sys.stdin.encoding or "utf-8", sys.stderr))
        sys.stdin.reconfigure(errors="replace")  # bytes typed or pasted in that are not text: U+FFFD, not a crash
        # A program started in the background of a script inherits SIGINT ignored; in a terminal, Ctrl-C must work.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_interactive(chat)
    except ModelLoadError as e:
        hint = " (train one with train.py, or pass --model_path)" if "not found" in str(e) else ""
        fail(f"{e}{hint}")
    except DataError as e:  # a --knowledge file
        fail(str(e))
    except ValueError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(file=info)
        return 130
    except BrokenPipeError:  # e.g. `python chat.py < questions.txt | head -1`
        sys.stderr.close()
        return 0
    except OSError as e:  # EIO: the terminal was closed while SIGHUP is ignored (nohup), else it ends us quietly
        fail("the terminal was closed" if e.errno == errno.EIO else f"{type(e).__name__}: {first_line(e)}", code=1)
    except Exception as e:  # never a traceback: one line that says what broke
        fail(f"{type(e).__name__}: {first_line(e)}", code=1)


if __name__ == "__main__":
    sys.exit(main())
