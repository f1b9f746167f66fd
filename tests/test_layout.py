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
