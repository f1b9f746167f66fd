"""The import graph the README's Layout describes: prompts.py on the ground floor, chat.py used only as an engine."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem for p in ROOT.glob("*.py")}


def project_imports(path):
    """The project's top-level modules that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES


def test_prompts_is_the_ground_floor():
    assert project_imports(ROOT / "prompts.py") == set()


def test_only_the_engines_users_import_chat():
    importers = {p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]
                 if "chat" in project_imports(p) and p.name != "chat.py"}
    assert {i for i in importers if not i.startswith("bench/")} <= {"app.py", "eval.py"}


def test_no_cycles_among_the_scripts():
    graph = {name: project_imports(ROOT / f"{name}.py") - {name} for name in MODULES}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph[start])

    assert not [name for name in graph if reaches(name, name)]


def test_the_prompts_are_byte_identical_to_those_before_they_moved_to_prompts_py():
    """tests/fixtures/prompts_before_issue20.json was written by chat.py / utils.py / export_gguf.py before the
    dialogue format moved into prompts.py: the Python prompt, the Jinja and the Ollama templates must not drift."""
    import json

    import prompts

    golden = json.loads((ROOT / "tests" / "fixtures" / "prompts_before_issue20.json").read_text(encoding="utf-8"))
    for case in golden["prompts"]:
        turns = [tuple(turn) for turn in case["turns"]]
        assert prompts.build_chat_prompt(turns, case["style"]) == case["prompt"]
        assert prompts.next_turn_prefix(turns, case["style"]) == case["prefix"]
        assert prompts.build_chat_prompt(turns, case["style"], instruction="Be brief.") == case["instructed"]
    for style in prompts.PROMPT_STYLES:
        assert prompts.chat_template_for(style) == golden["templates"][style]
        assert prompts.ollama_template(style) == golden["templates"]["ollama-" + style]
    for case in golden["records"]:
        assert prompts.build_prompt(case["record"]) == case["prompt"]
