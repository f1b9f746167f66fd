"""ChatDoctor in the browser: a gradio chat page over chat.py's dialogue engine (its prompt, history fitting,
KV cache, stopping and red-flag notices; nothing of them is copied here).

    python app.py                                            # ./pretrained on http://127.0.0.1:7860
    python app.py --model_path models/SmolLM2-135M-Instruct  # any model chat.py takes, with its flags
    python app.py --knowledge format_dataset.csv             # grounded answers, sources under each answer
    python app.py --host 0.0.0.0 --port 8080                 # reachable from other machines: mind who can see it
    python app.py --backend http://127.0.0.1:8080/v1 --backend_slots 4   # in front of a serving engine (make serve)

Each browser tab (or gradio_client.Client) is one conversation with its own history (and KV cache, in-process).
In-process the model answers one message at a time: the others wait in gradio's queue, so a CPU is never shared
mid-answer. In front of a serving engine (--backend), up to --backend_slots answers run at once (the engine's
parallel slots: it batches them), and the rest wait in the queue.

Limits, set for a public demo: no uploads (the page has no file input; gradio's upload route answers 403), at most
--max_sessions conversations and --max_sessions_per_client from one address, and a conversation in use is never
evicted to make room (a new one is refused with a message instead); a malformed API call is one line in the log.
"""
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import replace

# Before gradio is imported: this machine may be offline, and nothing about its use leaves it.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import chat  # noqa: E402
from prompts import DOCTOR, GREETING, SAFETY_NOTICE, answer_sources_line  # noqa: E402
from utils import DataError, ModelLoadError, fail, first_line, terminal_safe  # noqa: E402

log = logging.getLogger("chatdoctor.app")

EXAMPLES = [
    "Doctor, I have had a sore throat, fever and swollen glands in my neck for three days. What could it be?",
    "I get a burning pain in my stomach after meals, worse at night. What should I do?",
    "My child has a rash with small red spots and a mild fever. Should I worry?",
    "I have crushing chest pain and can't breathe.",
]
# Sessions kept at once, each with its history and KV cache (the cache of a long dialogue with a 135M model is
# tens of MB); a closed tab's goes at once. To make room, a session without messages goes first, then the least
# recently used idle one; a conversation in use is never taken: a new session is refused while all are in use.
MAX_SESSIONS = 64
# Sessions one client address may hold (its browser tabs): one client looping over new session ids evicts only its
# own sessions. Behind a reverse proxy every user has the proxy's address: raise it there.
MAX_SESSIONS_PER_CLIENT = 8
# A conversation with messages counts as in use until it has been left alone this long.
IDLE_SECONDS = 20 * 60
# A message is cut to this many characters before it reaches the tokenizer: chat.py cuts a message that is
# too long for the context, but tokenizing a pasted megabyte would hold the queue for everyone.
MAX_MESSAGE_CHARS = 20_000
QUEUE_SIZE = 100  # waiting requests beyond this are refused with a "too busy" message, not queued for ever
CSS = """
#banner {background: #fff4e5; border: 1px solid #f0a020; border-radius: 8px; padding: 4px 12px;}
#banner p {margin: 4px 0;}
"""


class Cancelled(Exception):
    """The page went away while its answer was being generated."""


# ----------------------------------------------------------------------------- sessions

class Session:
    """One browser session: its Chat (history and KV cache) and the messages its page shows."""

    def __init__(self, conversation, client=None):
        self.chat, self.client = conversation, client
        self.lock = threading.Lock()  # one answer or reset at a time within a session
        self.shown = [greeting()]
        self.last_used = time.monotonic()

    def reset(self):
        with self.lock:
            self.chat.reset()
            self.shown = [greeting()]

    def has_messages(self):
        return len(self.shown) > 1

    def in_use(self, now, idle_seconds=IDLE_SECONDS):
        """Answering now, or holding messages touched less than `idle_seconds` ago."""
        return self.lock.locked() or (self.has_messages() and now - self.last_used < idle_seconds)


class SessionsFull(Exception):
    """No session can be made without taking a conversation in use: the message says so to the user."""


class Sessions:
    """Sessions by gradio session hash, made on first use by `make_chat()`: at most `limit`, and at most
    `per_client` for one client address. Room is made by evicting a session not in use (one without messages
    first, then the least recently used); when every candidate is in use, SessionsFull."""

    def __init__(self, make_chat, limit=MAX_SESSIONS, per_client=MAX_SESSIONS_PER_CLIENT, idle_seconds=IDLE_SECONDS):
        self.make_chat, self.limit, self.per_client, self.idle_seconds = make_chat, limit, per_client, idle_seconds
        self.by_hash = OrderedDict()  # least recently used first
        self.lock = threading.Lock()

    def get(self, session_hash, client=None):
        with self.lock:
            session = self.by_hash.get(session_hash)
            if session is None:
                self.make_room(client)
                session = self.by_hash[session_hash] = Session(self.make_chat(), client)
            session.last_used = time.monotonic()
            self.by_hash.move_to_end(session_hash)
            return session

    def make_room(self, client):
        mine = [h for h, s in self.by_hash.items() if s.client == client]
        if len(mine) >= self.per_client and not self.evict_one(mine):
            log.warning("new session from %s refused: its %d sessions are all in use", client, len(mine))
            raise SessionsFull(f"Too many conversations from your address ({len(mine)}) are in use: close another "
                               "tab or finish a conversation there, then try again.")
        if len(self.by_hash) >= self.limit and not self.evict_one(list(self.by_hash)):
            log.warning("new session from %s refused: all %d sessions are in use", client, len(self.by_hash))
            raise SessionsFull(f"The demo is busy ({len(self.by_hash)} conversations in use): please try again in "
                               "a few minutes.")

    def evict_one(self, hashes):
        """Evict the first session of `hashes` (least recently used first) that is not in use, preferring one
        without messages; False when all are in use."""
        now = time.monotonic()
        idle = [h for h in hashes if not self.by_hash[h].in_use(now, self.idle_seconds)]
        if not idle:
            return False
        evicted = next((h for h in idle if not self.by_hash[h].has_messages()), idle[0])
        self.by_hash.pop(evicted)
        log.info("session %s evicted to make room", loggable(evicted))
        return True

    def drop(self, session_hash):
        with self.lock:
            self.by_hash.pop(session_hash, None)

    def __len__(self):
        return len(self.by_hash)


# ----------------------------------------------------------------------------- the page's messages

def greeting():
    return {"role": "assistant", "content": answer_prefix() + GREETING}


def patient_message(text):
    return {"role": "user", "content": text}


def notice_message(text):
    return {"role": "assistant", "content": text}


def emergency_message(notice):
    return notice_message(f"🚨 **{notice.lstrip('! ')}**")


def answer_prefix():
    return f"**{DOCTOR}:** "


def snapshot(messages):
    return [dict(m) for m in messages]


# ----------------------------------------------------------------------------- answering

def settings_for(generation, greedy, temperature, top_k, top_p, max_new_tokens):
    """generate()'s settings for the page's controls, the command line's other settings (GenerationSettings) kept.
    ValueError when a control is out of range."""
    page = replace(generation, greedy=bool(greedy), temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p), max_new_tokens=int(max_new_tokens))
    return page.check().generate_kwargs()


def answer(session, message, generation, model_lock, publish, cancelled):
    """Answer `message` in `session`: the page's messages after every change go to publish(messages).
    Any error ends as a short message on the page (and the full story in the log), never a traceback."""
    with session.lock, model_lock:
        before = list(session.shown)
        shown = session.shown
        if len(message) > MAX_MESSAGE_CHARS:
            shown.append(notice_message(f"_(your message has {len(message):,} characters: only its first "
                                        f"{MAX_MESSAGE_CHARS:,} are read)_"))
            message = message[:MAX_MESSAGE_CHARS]
        shown.insert(len(before), patient_message(message))
        notice = chat.emergency_notice(message)
        if notice:
            shown.append(emergency_message(notice))
        reply = {"role": "assistant", "content": answer_prefix()}
        shown.append(reply)
        publish(snapshot(shown))

        def on_text(chunk):
            if cancelled.is_set():
                raise Cancelled
            reply["content"] += chunk
            publish(snapshot(shown))

        def on_notice(note):
            shown.insert(len(shown) - 1, notice_message(f"_({note})_"))
            publish(snapshot(shown))

        try:
            session.chat.set_generation(generation)
            text = session.chat.respond(message, on_text=on_text, on_notice=on_notice)
            reply["content"] = answer_prefix() + (text or "_(no answer: ask again, or try sampling)_")
            if getattr(session.chat, "last_retrieval", None) is not None:
                reply["content"] += f"\n\n<small>{answer_sources_line(session.chat.last_hits)}</small>"
        except Cancelled:
            session.shown = before  # as chat.py forgets an answer stopped with Ctrl-C
            return
        except Exception as e:  # the page gets one line; the log gets the traceback
            if chat.engine_failed(e):  # the serving engine is down, slow or refusing: not a bug of ours
                log.warning("no answer from the engine: %s", e)
                reply["content"] = (f"⚠️ No answer: the model server failed ({first_line(e)[:300]}). "
                                    "Send your message again once it is back; the conversation goes on.")
                publish(snapshot(shown))
                return
            log.exception("answering failed")
            reply["content"] = (f"⚠️ Sorry, that answer failed ({type(e).__name__}: {first_line(e)[:200]}). "
                                "The conversation goes on from your previous message.")
        publish(snapshot(shown))


def stream_answer(session, message, generation, model_lock):
    """The page's messages as the answer grows (for a gradio generator). If the page goes away (the generator is
    closed), the answer is stopped at its next token and forgotten."""
    updates, cancelled, done = queue.Queue(), threading.Event(), object()

    def work():
        try:
            answer(session, message, generation, model_lock, updates.put, cancelled)
        finally:
            updates.put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        finished = False
        while not finished and (item := updates.get()) is not done:
            while not updates.empty():  # only the newest state is worth sending
                newer = updates.get()
                finished = newer is done
                if finished:
                    break
                item = newer
            yield item
    finally:
        cancelled.set()


# ----------------------------------------------------------------------------- the page

def sources_markdown(session):
    return chat.sources_table(getattr(session.chat, "last_retrieval", None)).replace("\n", "  \n")


def client_address(request):
    """The client's address as the server saw the connection (not X-Forwarded-For, which any client can write)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"


def page_handlers(generation, sessions, model_lock):
    """What the page's events call: respond (stream an answer), reset (a new conversation), forget (a closed tab)."""
    import gradio as gr

    def respond(message, greedy, temperature, top_k, top_p, max_new_tokens, request: gr.Request):
        try:
            session = sessions.get(request.session_hash, client_address(request))
        except SessionsFull as e:
            yield message, [notice_message(f"⚠️ {e}")], ""
            return
        message = message.strip() if isinstance(message, str) else ""
        if not message:
            yield "", session.shown, sources_markdown(session)
            return
        try:
            settings = settings_for(generation, greedy, temperature, top_k, top_p, max_new_tokens)
        except (TypeError, ValueError) as e:
            yield message, session.shown + [notice_message(f"_(settings not understood: {first_line(e)})_")], ""
            return
        for shown in stream_answer(session, message, settings, model_lock):
            yield "", shown, gr.skip()
        yield "", session.shown, sources_markdown(session)

    def reset(request: gr.Request):
        try:
            session = sessions.get(request.session_hash, client_address(request))
        except SessionsFull as e:
            return "", [notice_message(f"⚠️ {e}")], ""
        session.reset()
        return "", session.shown, sources_markdown(session)

    def forget(request: gr.Request):
        sessions.drop(request.session_hash)

    return respond, reset, forget


def settings_panel(generation, max_tokens_limit):
    """The sampling controls, set to the command line's settings: [greedy, temperature, top_k, top_p, max tokens]."""
    import gradio as gr

    with gr.Accordion("Settings", open=False):
        return [
            gr.Checkbox(value=generation.greedy, label="Greedy (deterministic: always the most likely word)"),
            gr.Slider(0, 2, value=generation.temperature, step=0.05, label="Temperature (sampling)"),
            gr.Slider(0, 200, value=generation.top_k, step=1, label="Top-k (sampling; 0 = all)"),
            gr.Slider(0.05, 1, value=generation.top_p, step=0.05, label="Top-p (sampling)"),
            gr.Slider(1, max_tokens_limit, value=min(generation.max_new_tokens, max_tokens_limit), step=1,
                      label="Max new tokens"),
        ]


def build_page(generation, sessions, where, knowledge_on, max_tokens_limit, slots=1):
    """The page; `slots` answers at once (1 in-process; with --backend, the engine's parallel slots)."""
    import gradio as gr

    # besides the queue's limit: no path ever runs more than `slots` answers at once
    respond, reset, forget = page_handlers(generation, sessions, threading.BoundedSemaphore(slots))
    with gr.Blocks(title="ChatDoctor") as page:
        gr.Markdown(f"⚠️ **{SAFETY_NOTICE}** In an emergency call your local emergency number (112 / 911 / 999).",
                    elem_id="banner")
        conversation = gr.Chatbot(value=[greeting()], label="ChatDoctor", elem_id="conversation", height=460,
                                  group_consecutive_messages=False, feedback_options=None, buttons=["copy"])
        with gr.Row():
            message = gr.Textbox(placeholder="Describe your symptoms, then press Enter", show_label=False,
                                 elem_id="message", scale=5, autofocus=True)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            new = gr.Button("New conversation", elem_id="reset", scale=1)
        gr.Examples(EXAMPLES, inputs=message, label="Example questions")
        with gr.Accordion("Sources of the last answer", open=False, visible=knowledge_on):
            sources = gr.Markdown(elem_id="sources")
        controls = settings_panel(generation, max_tokens_limit)
        gr.Markdown(f"<small>{where}</small>", elem_id="model")

        inputs, outputs = [message, *controls], [message, conversation, sources]
        # One concurrency group for both ways to send: the model answers `slots` messages at a time.
        message.submit(respond, inputs, outputs, api_name="respond", concurrency_id="model")
        send.click(respond, inputs, outputs, api_name=False, concurrency_id="model")
        new.click(reset, None, outputs, api_name="reset", concurrency_limit=None, queue=False)
        conversation.clear(reset, None, outputs, api_name=False, queue=False)  # the chat box's own bin button
        page.unload(forget)
    return page


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = chat.argument_parser("ChatDoctor in the browser (a gradio page).", one_shot=False)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network interface)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--max_sessions", type=int, default=MAX_SESSIONS, help="conversations kept at once")
    s.add_argument("--max_sessions_per_client", type=int, default=MAX_SESSIONS_PER_CLIENT,
                   help="conversations one client address may hold (behind a reverse proxy all users share one)")
    s.add_argument("--backend_slots", type=int, default=1,
                   help="with --backend: answers at once, the engine's parallel slots (llama.cpp --parallel, "
                        "Ollama OLLAMA_NUM_PARALLEL; vLLM batches up to --max-num-seqs); the rest wait in the queue")
    args = chat.parse_args(argv, p)
    if args.max_sessions < 1 or args.max_sessions_per_client < 1 or args.backend_slots < 1:
        p.error("--max_sessions, --max_sessions_per_client and --backend_slots must be at least 1")
    return args


# ----------------------------------------------------------------------------- serving safely

class RefuseUploads:
    """ASGI middleware: gradio's upload route answers 403. The page has no file input; without this, any client
    could store files of any size on the server (and have them served back)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/upload"):
            log.warning("upload refused from %s", (scope.get("client") or ["unknown"])[0])
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"uploads are off on this server\n"})
            return
        await self.app(scope, receive, send)


def loggable(text):
    """Text a client chose (a session id, a value quoted in an error) as it may enter the log: one line, no escape
    sequences for the terminal that shows the log."""
    return terminal_safe(text, one_line=True)


class OneLineErrors(logging.Filter):
    """A log record's exception as one line (type and first line of its message) instead of a traceback."""

    def filter(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage().strip()}: {type(error).__name__}: {loggable(first_line(error))}"
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def log_request_errors_as_one_line():
    """A malformed API call (too few inputs, a string for a slider, an unknown fn_index) makes gradio print a
    traceback with traceback.print_exc() and uvicorn log one: the server's log gets one line each instead. Errors
    of the app's own code are still logged whole (answer())."""
    def print_exc(limit=None, file=None, chain=True):
        error = sys.exc_info()[1]
        log.warning("request failed: %s: %s", type(error).__name__, loggable(first_line(error)))

    traceback.print_exc = print_exc  # gradio's queue calls it by this name for every request it cannot process
    logging.getLogger("uvicorn.error").addFilter(OneLineErrors())


def private_temp_dir():
    """A folder of this server's own for gradio's cache files (GRADIO_TEMP_DIR), deleted when it stops."""
    folder = tempfile.mkdtemp(prefix="chatdoctor-app-", dir=os.environ.get("GRADIO_TEMP_DIR"))
    os.environ["GRADIO_TEMP_DIR"] = folder
    return folder


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's requests to itself at start
    generation = chat.settings_from(args, chat.GenerationSettings)
    try:
        engine = chat.load_engine(chat.settings_from(args, chat.EngineSettings), sys.stderr)
        first = engine.new_chat(generation)  # bad settings fail here, before serving
    except (ModelLoadError, DataError, ValueError) as e:
        fail(str(e))
    except Exception as e:
        fail(f"{type(e).__name__}: {first_line(e)}", code=1)
    made = [first]  # the first session gets the Chat made above

    def make_chat():
        return made.pop() if made else engine.new_chat(generation)

    max_tokens_limit = max(args.max_new_tokens, min(1024, getattr(first, "context", 2048) // 2))
    sessions = Sessions(make_chat, args.max_sessions, args.max_sessions_per_client)
    temp_dir = private_temp_dir()  # before gradio is imported: it reads GRADIO_TEMP_DIR then
    try:
        slots = args.backend_slots if engine.backend is not None else 1  # in-process: one answer at a time
        page = build_page(generation, sessions, engine.where, engine.knowledge_base is not None, max_tokens_limit,
                          slots)
        return serve(args, page, engine.where, slots)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def serve(args, page, where, slots=1):
    """Serve `page`, `slots` answers at once, until Ctrl-C, SIGTERM or SIGHUP; then close the server."""
    import gradio as gr
    from starlette.middleware import Middleware

    page.queue(default_concurrency_limit=slots, max_size=QUEUE_SIZE)
    log_request_errors_as_one_line()
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # offline
    print(f"ChatDoctor on http://{args.host}:{args.port} ({where}). {SAFETY_NOTICE}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    started = time.perf_counter()
    try:
        page.launch(server_name=args.host, server_port=args.port, share=False, show_error=False, ssr_mode=False,
                    theme=theme, css=CSS, quiet=True, footer_links=["api"], max_file_size=0,
                    app_kwargs={"middleware": [Middleware(RefuseUploads)]}, prevent_thread_lock=True)
    except OSError as e:  # the port is taken, or the address is not this machine's
        fail(f"cannot serve on {args.host}:{args.port}: {first_line(e)}", code=1)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    log.info("stopped after %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
