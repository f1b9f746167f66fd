"""A client for one OpenAI-compatible endpoint: OpenAI itself, vLLM, SGLang, llama.cpp's server, Ollama.

    from backend import Backend, BackendError
    engine = Backend("http://127.0.0.1:8000/v1", model="chatdoctor")     # key: $OPENAI_API_KEY, if the server needs one
    reply = engine.chat([{"role": "user", "content": "Hello"}], max_tokens=64)        # Reply(text, tokens_in, ...)
    reply = engine.complete("### Instruction: ...", max_tokens=64, stop=["Patient:"])   # the project's own prompt
    for piece in engine.stream("### Instruction: ...", max_tokens=64, stop=["Patient:"]):
        print(piece, end="", flush=True)

Built on the `openai` package: it retries timeouts, dropped connections, 408, 409, 429 and 5xx with exponential
back-off (0.5 s doubling to 8 s, or the server's Retry-After), `retries` times. Anything that still fails, and
a reply that is not what the API promises, raises BackendError with one line naming the endpoint and the
status or cause. The key is read from an environment variable only (never a flag or a file).
"""
import os
from dataclasses import dataclass

import openai

API_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "none"  # local engines ignore the key, but the client wants a non-empty one
DEFAULT_TIMEOUT = 120.0  # seconds for one request (a stream: between two pieces); a CPU engine under load is slow
DEFAULT_RETRIES = 3


class BackendError(RuntimeError):
    """The endpoint did not give a usable answer: one line naming it and the status or cause."""


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop", "length", ...
    tokens_in: int  # as the server counts them (0 where it does not say)
    tokens_out: int


class Backend:
    def __init__(self, base_url, model, timeout=DEFAULT_TIMEOUT, retries=DEFAULT_RETRIES, api_key_env=API_KEY_ENV):
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.timeout = timeout
        self.client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get(api_key_env) or NO_KEY,
                                    timeout=timeout, max_retries=retries)

    def __repr__(self):
        return f"Backend({self.base_url!r}, model={self.model!r})"

    def models(self):
        """The model names the endpoint serves (a cheap check that it is up)."""
        with self._errors():
            return [m.id for m in self.client.models.list().data]

    def chat(self, messages, max_tokens=256, temperature=0.7, top_p=1.0, stop=None, seed=None, extra_body=None):
        """One chat-completions answer to `messages` ([{"role", "content"}, ...]); the engine applies its template."""
        with self._errors():
            response = self.client.chat.completions.create(**given(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                stop=stop, seed=seed, extra_body=extra_body))
            choice = self._first_choice(response)
            return Reply(self._text(choice.message.content), choice.finish_reason or "", *self._usage(response))

    def complete(self, prompt, max_tokens=256, temperature=0.7, top_p=1.0, stop=None, seed=None,
                 repetition_penalty=None, frequency_penalty=None, extra_body=None):
        """One completions answer that continues `prompt` verbatim (the project builds the whole prompt)."""
        with self._errors():
            response = self.client.completions.create(
                **self._completion_args(prompt, max_tokens, temperature, top_p, stop, seed, repetition_penalty,
                                        frequency_penalty, extra_body))
            choice = self._first_choice(response)
            return Reply(self._text(choice.text), choice.finish_reason or "", *self._usage(response))

    def stream(self, prompt, max_tokens=256, temperature=0.7, top_p=1.0, stop=None, seed=None,
               repetition_penalty=None, frequency_penalty=None, extra_body=None):
        """The completion of `prompt` piece by piece as the engine sends it (server-sent events).

        A failure before the first piece is retried like any request; one after it raises BackendError (the
        caller has shown part of the answer and decides what to do)."""
        with self._errors():
            pieces = self.client.completions.create(
                stream=True, **self._completion_args(prompt, max_tokens, temperature, top_p, stop, seed,
                                                     repetition_penalty, frequency_penalty, extra_body))
            finished = None
            with pieces:
                for chunk in pieces:
                    if chunk.choices:
                        text = chunk.choices[0].text
                        finished = chunk.choices[0].finish_reason or finished
                        if text:
                            yield self._text(text)
            if finished is None:  # e.g. llama-cpp-python ends the stream quietly when its model call fails
                raise BackendError(f"{self.base_url}: the answer stopped without finishing (the engine failed "
                                   "mid-answer: see its log)")

    # ------------------------------------------------------------------------- internals

    def _completion_args(self, prompt, max_tokens, temperature, top_p, stop, seed, repetition_penalty,
                         frequency_penalty, extra_body=None):
        # repetition_penalty is not in OpenAI's API: vLLM, SGLang and llama.cpp's server read it from the body.
        # extra_body: other fields engines read beyond OpenAI's (top_k, min_p, llama.cpp's repeat_penalty).
        extra = {"repetition_penalty": repetition_penalty} if repetition_penalty is not None else {}
        extra = {**extra, **(extra_body or {})} or None
        return given(model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                     stop=stop, seed=seed, frequency_penalty=frequency_penalty, extra_body=extra)

    def _first_choice(self, response):
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise BackendError(f"{self.base_url}: malformed reply (no choices): {str(response)[:80]!r}")
        return choices[0]

    def _text(self, text):
        if not isinstance(text, str):
            raise BackendError(f"{self.base_url}: malformed reply (text is {type(text).__name__})")
        return text

    @staticmethod
    def _usage(response):
        usage = getattr(response, "usage", None)
        return (getattr(usage, "prompt_tokens", 0) or 0), (getattr(usage, "completion_tokens", 0) or 0)

    def _errors(self):
        return _OneLineErrors(self)


class _OneLineErrors:
    """Turns whatever the client raises into BackendError with one line naming the endpoint."""

    def __init__(self, backend):
        self.backend = backend

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, (BackendError, GeneratorExit, KeyboardInterrupt)):
            return False
        raise BackendError(f"{self.backend.base_url}: {describe(error, self.backend)}") from error


def given(**arguments):
    """The arguments that have a value: the client sends None as JSON null, which some engines reject."""
    return {name: value for name, value in arguments.items() if value is not None}


def describe(error, backend):
    """What went wrong, in a few words (the status, the server's message, the cause)."""
    retries = backend.client.max_retries
    tries = f"{retries + 1} tries" if retries else "no retries"
    if isinstance(error, openai.APITimeoutError):
        return f"no answer within {backend.timeout:g} s ({tries})"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error.__context__
        return f"cannot connect ({first_line(cause) if cause else error.message}; {tries})"
    if isinstance(error, openai.APIStatusError):
        retried = f"; {tries}" if error.status_code in (408, 409, 429) or error.status_code >= 500 else ""
        return f"HTTP {error.status_code} {first_line(_server_message(error))}{retried}"
    if isinstance(error, (openai.APIResponseValidationError, ValueError, TypeError, AttributeError, KeyError)):
        return f"malformed reply ({type(error).__name__}: {first_line(error)})"
    if isinstance(error, openai.OpenAIError):
        return first_line(error)
    if isinstance(error, OSError):
        return f"connection lost ({type(error).__name__}: {first_line(error)})"
    return f"malformed reply ({type(error).__name__}: {first_line(error)})"


def _server_message(error):
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return str(message)
    return error.response.reason_phrase or error.message


def first_line(value, limit=160):
    text = " ".join(str(value).split())
    return text[:limit] + ("..." if len(text) > limit else "")
