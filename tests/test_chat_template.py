"""The chat template saved with a model renders exactly chat.py's prompt for it, so that vLLM, TGI, llama.cpp and
Ollama prompt the model as chat.py does (and as train.py trained it)."""
import shutil

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prepare
import prompts
import utils
from prompts import CHATDOCTOR_INSTRUCTION, PROMPT_DICT, build_prompt

STYLES = ["chatdoctor", "alpaca"]
AWKWARD = 'He said "it {{ hurts }}" {% raw %}\n\tthen {# fainted #}\\n and it\'s {%- endif %} }} %} ü 🤒'
DIALOGUES = {
    "one question": [("Patient", "I have a cough.")],
    "empty question": [("Patient", "")],
    "two questions": [("Patient", "I have a cough."), ("ChatDoctor", "How long?"), ("Patient", AWKWARD)],
    "three questions": [("Patient", AWKWARD), ("ChatDoctor", "Any fever?\n\nPatient: no"), ("Patient", "Yes, 39 C."),
                        ("ChatDoctor", AWKWARD), ("Patient", "What should I do?\n")],
}


@pytest.fixture(scope="module")
def tokenizer_for(tokenizer):
    """The real SmolLM2 tokenizer carrying a style's template."""
    tokenizers = {}
    for style in STYLES:
        tokenizers[style] = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        tokenizers[style].chat_template = prompts.chat_template_for(style)
    return tokenizers.__getitem__


def render(tokenizer, messages, add_generation_prompt=True):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", DIALOGUES)
def test_rendered_messages_are_chat_pys_prompt(tokenizer_for, style, name):
    turns = DIALOGUES[name]
    tokenizer = tokenizer_for(style)
    assert render(tokenizer, prompts.messages_of(turns)) == prompts.build_chat_prompt(turns, style)


def test_the_two_styles_are_the_original_text_and_the_training_record(tokenizer_for):
    """Pinned against the texts themselves, not only against build_chat_prompt."""
    messages = [{"role": "user", "content": "I have a cough."}]
    assert render(tokenizer_for("chatdoctor"), messages) == (
        "If you are a doctor, please answer the medical questions based on the patient's description. \n\n"
        "ChatDoctor: I am ChatDoctor, what medical questions do you have?\n\nPatient: I have a cough.\n\nChatDoctor: ")
    assert render(tokenizer_for("alpaca"), messages) == PROMPT_DICT["prompt_input"].format(
        instruction=CHATDOCTOR_INSTRUCTION, input="I have a cough.")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", DIALOGUES)
def test_a_system_message_takes_the_place_of_the_instruction(tokenizer_for, style, name):
    turns, instruction = DIALOGUES[name], "Answer in one sentence. " + AWKWARD
    rendered = render(tokenizer_for(style), prompts.messages_of(turns, instruction))
    assert rendered == prompts.build_chat_prompt(turns, style, instruction=instruction)
    assert CHATDOCTOR_INSTRUCTION not in rendered


@pytest.mark.parametrize("style", STYLES)
def test_without_generation_prompt_the_answer_header_is_left_off(tokenizer_for, style):
    turns = DIALOGUES["two questions"]
    tokenizer = tokenizer_for(style)
    without = render(tokenizer, prompts.messages_of(turns), add_generation_prompt=False)
    header = {"chatdoctor": "\n\nChatDoctor: ", "alpaca": "\n\n### Response:"}[style]
    assert without + header == prompts.build_chat_prompt(turns, style)


def test_alpaca_dialogue_ending_in_an_answer_is_a_training_record(tokenizer_for):
    """What train.py trains on: prompt, output, EOS (utils.tokenize_supervised)."""
    tokenizer = tokenizer_for("alpaca")
    answered = [("Patient", "I have a cough."), ("ChatDoctor", "Drink warm water.")]
    record = {"instruction": CHATDOCTOR_INSTRUCTION, "input": "I have a cough.", "output": "Drink warm water."}
    for add_generation_prompt in (True, False):
        assert render(tokenizer, prompts.messages_of(answered), add_generation_prompt) == (
            build_prompt(record) + record["output"] + tokenizer.eos_token)
    longer = DIALOGUES["three questions"] + [("ChatDoctor", "Rest.")]
    assert render(tokenizer, prompts.messages_of(longer)) == (
        prompts.build_chat_prompt(longer[:-1], "alpaca") + "Rest." + tokenizer.eos_token)


def test_chatdoctor_dialogue_ending_in_an_answer_is_the_transcript(tokenizer_for):
    turns = DIALOGUES["two questions"] + [("ChatDoctor", "Rest.")]
    assert render(tokenizer_for("chatdoctor"), prompts.messages_of(turns)) == (
        prompts.build_chat_prompt(turns[:-1], "chatdoctor") + "Rest.")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}],
    [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "hi"}],
    [{"role": "tool", "content": "{}"}, {"role": "user", "content": "hi"}],
])
def test_other_roles_and_late_system_messages_are_refused(tokenizer_for, style, messages):
    with pytest.raises(jinja2.TemplateError, match="got role (system|tool)"):
        render(tokenizer_for(style), messages)


turn_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(turn_text, min_size=1, max_size=7), instruction=st.none() | turn_text,
       style=st.sampled_from(STYLES))
def test_any_text_renders_as_chat_pys_prompt(tokenizer_for, texts, instruction, style):
    texts = texts if len(texts) % 2 else texts[:-1]  # the patient's turn is the newest
    turns = [("Patient" if i % 2 == 0 else "ChatDoctor", text) for i, text in enumerate(texts)]
    extra = {} if instruction is None else {"instruction": instruction}
    assert render(tokenizer_for(style), prompts.messages_of(turns, instruction)) == (
        prompts.build_chat_prompt(turns, style, **extra))


# ----------------------------------------------------------------------------- installed with the model

# prepare.make_model's conversion is tested on a tiny GGUF in test_export_gguf.py.
def assert_serves_chat_pys_prompt(model_dir, style):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # no project code
    assert tokenizer.chat_template == prompts.chat_template_for(style)
    assert utils.prompt_style_for(model_dir) == style
    turns = DIALOGUES["three questions"]
    assert render(tokenizer, prompts.messages_of(turns)) == prompts.build_chat_prompt(turns, style)


def test_train_py_saves_the_alpaca_template(trained_tiny_dir):
    assert_serves_chat_pys_prompt(trained_tiny_dir, "alpaca")


def test_chat_template_command_fixes_an_existing_folder(trained_tiny_dir, tiny_model_dir, tmp_path, capsys):
    trained, base = tmp_path / "trained", tmp_path / "base"
    shutil.copytree(trained_tiny_dir, trained)
    shutil.copytree(tiny_model_dir, base)
    (trained / "chat_template.jinja").write_text("{{ 'ChatML or anything else' }}")
    for folder, style in ((trained, "alpaca"), (base, "chatdoctor")):
        prepare.main(["chat-template", str(folder)])
        assert f"the {style} prompt" in capsys.readouterr().out
        assert_serves_chat_pys_prompt(folder, style)
    prepare.main(["chat-template", str(base), "--prompt_style", "alpaca"])
    assert render(tokenizer_of(base), [{"role": "user", "content": "hi"}]).startswith("Below is an instruction")


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_chat_template_command_on_a_missing_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare.main(["chat-template", str(tmp_path / "nowhere")])
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nowhere'}: model folder not found"
    assert not (tmp_path / "nowhere").exists()
