"""What `eval.py --compare` and `benchmarks.py --compare` share; each script keeps only what it scores.

    models = parse_compare(["base=models/SmolLM2-135M-Instruct", "final=pretrained@knowledge"], options=MODES)
    indices = spread_indices(len(records), 50)          # the same examples for every model
    results = run_models(models, out_root, compare, score_one)   # score_one(model, out) -> result
    write_comparison(out_root, results, results_md, section, png, begin, end, heading)

A comparison writes OUT_ROOT/comparison.json, a PNG beside the results file, and rewrites one generated section of
that markdown file (between its markers), leaving everything else in it as it is.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from utils import ModelLoadError, check_model_path, replace_markdown_section, write_atomic


@dataclass(frozen=True)
class Compared:
    """One NAME=PATH[@OPTION,...] of --compare."""
    name: str
    path: str
    options: tuple = field(default_factory=tuple)


def parse_compare(items, options=(), example="base=models/SmolLM2-135M-Instruct"):
    """[Compared] from NAME=PATH items; with `options`, NAME=PATH@OPTION[,OPTION] may name some of them.
    ModelLoadError (one line) on a malformed item or a name given twice."""
    models = []
    for item in items:
        name, sep, path = item.partition("=")
        path, _, given = path.partition("@") if options and "@" in path else (path, "", "")
        given = tuple(o for o in given.split(",") if o)
        if not sep or not name or not path or any(o not in options for o in given):
            form = f"NAME=PATH[@OPTION[,OPTION]] with an option among {', '.join(options)}" if options else "NAME=PATH"
            raise ModelLoadError(f"--compare {item!r}: expected {form}, e.g. {example}")
        models.append(Compared(name, path, given))
    if len({m.name for m in models}) != len(models):
        raise ModelLoadError("--compare: model names must be distinct")
    return models


def spread_indices(total, n):
    """Indices of N items spread evenly over `total` (all when n is 0 or covers them): not the first N, whose style
    can differ from the rest of a file (eval.py's held-out split does)."""
    if not n or n >= total:
        return list(range(total))
    return [i * total // n for i in range(n)]


def check_paths(models):
    """Every model path checked before any model runs (a typo in the last must not waste the first's hour)."""
    for model in models:
        check_model_path(model.path)


def output_root(output_dir, default_parent, models, compare):
    """Where results go: --output_dir, else DEFAULT_PARENT (a comparison) or DEFAULT_PARENT/<model name>."""
    return Path(output_dir or (Path(default_parent) / ("" if compare else models[0].name)))


def read_finished(path, *companions, same_settings=lambda saved: True):
    """The JSON an earlier run left at `path` (--reuse_finished) when it and its `companions` exist and
    same_settings(saved) holds; else None, and the run is done again."""
    if not Path(path).is_file() or not all(Path(c).is_file() for c in companions):
        return None
    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    return saved if same_settings(saved) else None


def run_models(models, out_root, compare, score_one):
    """{name: score_one(model, its output folder)} for each model, in order: OUT_ROOT/NAME when comparing."""
    return {m.name: score_one(m, out_root / m.name if compare else out_root) for m in models}


def command_line(script, argv):
    """The command that made a section, as the reader would type it again."""
    import sys

    return f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv)


def save_figure(figure, png_path):
    """A matplotlib Figure as a PNG, written whole or not at all."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return write_atomic(png_path, buffer.getvalue())


def write_comparison(out_root, results, results_md, section, begin, end, heading):
    """OUT_ROOT/comparison.json, and `section` between the markers of `heading` in `results_md`."""
    write_atomic(Path(out_root) / "comparison.json", json.dumps(results, indent=1) + "\n")
    return replace_markdown_section(results_md, section, begin, end, heading=heading)
