"""ChatDoctor in the browser: a gradio chat page over chat.py's dialogue engine (its prompt, history fitting,
KV cache, stopping and red-flag notices; nothing of them is copied here).

    python app.py                                            # ./pretrained on http://127.0.0.1:7860
    python app.py --model_path models/SmolLM2-135M-Instruct  # any model chat.py takes, with its flags
    python app.py --knowledge format_dataset.csv             # grounded answers, sources under each answer
    python app.py --host 0.0.0.0 --port 8080                 # reachable from other machines: mind who can see it

Each browser tab (or gradio_client.Client) is one conversation with its own history and KV cache. The model
answers one message at a time: the others wait in gradio's queue, so a CPU is never shared mid-answer.
"""
import logging
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import replace

# Before gradio is imported: this machine may be offline, and nothing about its use leaves it.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import chat  # noqa: E402
from prompts import DOCTOR, GREETING, SAFETY_NOTICE, sources_line  # noqa: E402
from utils import DataError, ModelLoadError, fail, first_line  # noqa: E402

log = logging.getLogger("chatdoctor.app")

EXAMPLES = [
    "Doctor, I have had a sore throat, fever and swollen glands in my neck for three days. What could it be?",
    "I get a burning pain in my stomach after meals, worse at night. What should I do?",
    "My child has a rash with small red spots and a mild fever. Should I worry?",
    "I have crushing chest pain and can't breathe.",
]
# Sessions kept at once, each with its history and KV cache (the cache of a long dialogue with a 135M model is
# tens of MB); the least recently used goes first, and a closed tab's at once.
MAX_SESSIONS = 64
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

    def __init__(self, conversation):
        self.chat = conversation
        self.lock = threading.Lock()  # one answer or reset at a time within a session
        self.shown = [greeting()]

    def reset(self):
        with self.lock:
            self.chat.reset()
            self.shown = [greeting()]


class Sessions:
    """Sessions by gradio session hash, made on first use by `make_chat()`; at most `limit`, least recently
    used evicted."""

    def __init__(self, make_chat, limit=MAX_SESSIONS):
        self.make_chat, self.limit = make_chat, limit
        self.by_hash = OrderedDict()
        self.lock = threading.Lock()

    def get(self, session_hash):
        with self.lock:
            session = self.by_hash.get(session_hash)
            if session is None:
                session = self.by_hash[session_hash] = Session(self.make_chat())
                while len(self.by_hash) > self.limit:
                    evicted, _ = self.by_hash.popitem(last=False)
                    log.info("session %s evicted (more than %d sessions)", evicted, self.limit)
            self.by_hash.move_to_end(session_hash)
            return session

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
            if session.chat.last_hits:
                reply["content"] += f"\n\n<small>{sources_line(session.chat.last_hits)}</small>"
        except Cancelled:
            session.shown = before  # as chat.py forgets an answer stopped with Ctrl-C
            return
        except Exception as e:  # the page gets one line; the log gets the traceback
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
    return chat.sources_table(session.chat.last_hits).replace("\n", "  \n")


def build_page(generation, sessions, where, knowledge_on, max_tokens_limit):
    import gradio as gr

    model_lock = threading.Lock()  # besides the queue's limit of one: no path ever runs two answers at once

    def respond(message, greedy, temperature, top_k, top_p, max_new_tokens, request: gr.Request):
        session = sessions.get(request.session_hash)
        message = (message or "").strip()
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
        session = sessions.get(request.session_hash)
        session.reset()
        return "", session.shown, sources_markdown(session)

    def forget(request: gr.Request):
        sessions.drop(request.session_hash)

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
        with gr.Accordion("Settings", open=False):
            greedy = gr.Checkbox(value=generation.greedy, label="Greedy (deterministic: always the most likely word)")
            temperature = gr.Slider(0, 2, value=generation.temperature, step=0.05, label="Temperature (sampling)")
            top_k = gr.Slider(0, 200, value=generation.top_k, step=1, label="Top-k (sampling; 0 = all)")
            top_p = gr.Slider(0.05, 1, value=generation.top_p, step=0.05, label="Top-p (sampling)")
            max_new_tokens = gr.Slider(1, max_tokens_limit, value=min(generation.max_new_tokens, max_tokens_limit), step=1,
                                       label="Max new tokens")
        gr.Markdown(f"<small>{where}</small>", elem_id="model")

        inputs = [message, greedy, temperature, top_k, top_p, max_new_tokens]
        outputs = [message, conversation, sources]
        # One concurrency group for both ways to send: the model answers one message at a time.
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
    return chat.parse_args(argv, p)


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
    page = build_page(generation, Sessions(make_chat), engine.where, engine.knowledge_base is not None,
                      max_tokens_limit)
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # offline
    print(f"ChatDoctor on http://{args.host}:{args.port} ({engine.where}). {SAFETY_NOTICE}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        page.launch(server_name=args.host, server_port=args.port, share=False, show_error=False, ssr_mode=False,
                    theme=theme, css=CSS, quiet=True, footer_links=["api"])
    except OSError as e:  # the port is taken, or the address is not this machine's
        fail(f"cannot serve on {args.host}:{args.port}: {first_line(e)}", code=1)
    except KeyboardInterrupt:
        pass
    log.info("stopped after %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
