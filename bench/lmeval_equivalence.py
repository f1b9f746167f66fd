"""benchmarks.py against lm-evaluation-harness itself: the same model and questions through both, prompt strings and
per-choice log-likelihoods compared. Needs lm-eval, which the project does not install; run it from a separate venv:

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0 transformers==5.24.0 accelerate==1.15.0 lm-eval==0.4.13
    HF_DATASETS_OFFLINE=1 /tmp/lmeval-venv/bin/python bench/lmeval_equivalence.py --limit 8 --num_fewshot 0 2
    ... --fixture tests/fixtures/lmeval_reference.json   # also save lm-eval's side for tests/test_benchmarks.py

lm-eval reads data/benchmarks/*.jsonl through task YAMLs written to a temporary folder: each includes lm-eval's own
task file (medmcqa, pubmedqa, MMLU's template), so the prompt comes from lm-eval's code, and only the dataset, the
split and the field names are adapted (`process_docs`). MedQA's task has four options where the file has five: its
doc_to_text is lm-eval's with a fifth line, checked equal to lm-eval's own on the first four. Both sides score the
first --limit questions (lm-eval's --limit), --model hf in float32 on the CPU. The table goes into docs/RESULTS.md.
"""
import argparse
import json
import os
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import benchmarks  # noqa: E402
from utils import replace_markdown_section, write_json_atomic  # noqa: E402

SECTION_BEGIN = "<!-- bench/lmeval_equivalence.py: begin (generated; edits inside are overwritten) -->"
SECTION_END = "<!-- bench/lmeval_equivalence.py: end -->"
TOLERANCE = 1e-4

# process_docs for each task: our JSONL records -> the fields lm-eval's own doc_to_text reads.
ADAPTERS = '''
import re
import sys
sys.path.insert(0, {root!r})
import benchmarks


def _options(doc):
    return benchmarks.parse_options("lm-eval", 0, doc["options"])


def _gold(doc, options):
    return benchmarks.gold_letter("lm-eval", 0, doc["answer"], options)


def medqa_docs(dataset):
    def convert(doc):
        options = _options(doc)
        out = {{"sent1": doc["question"], "label": _gold(doc, options)}}
        out.update({{f"ending{{i}}": o for i, o in enumerate(options)}})
        return out
    return dataset.map(convert, remove_columns=dataset.column_names)


def medqa_doc_to_text(doc):
    """lm_eval/tasks/medqa/preprocess_medqa.py's doc_to_text with a fifth ending."""
    option_choices = {{"A": doc["ending0"], "B": doc["ending1"], "C": doc["ending2"], "D": doc["ending3"],
                      "E": doc["ending4"]}}
    answers = "".join((f"{{k}}. {{v}}\\n") for k, v in option_choices.items())
    return f"Question: {{doc['sent1']}}\\n{{answers}}Answer:"


def medmcqa_docs(dataset):
    def convert(doc):
        options = _options(doc)
        return {{"question": doc["question"], "opa": options[0], "opb": options[1], "opc": options[2],
                "opd": options[3], "cop": _gold(doc, options)}}
    return dataset.map(convert, remove_columns=dataset.column_names)


def pubmedqa_docs(dataset):
    def convert(doc):
        return {{"QUESTION": doc["question"], "CONTEXTS": benchmarks.abstract_contexts(doc["passage"]),
                "final_decision": doc["answer"]}}
    return dataset.map(convert, remove_columns=dataset.column_names)


def mmlu_docs(dataset):
    def convert(doc):
        options = _options(doc)
        return {{"question": doc["question"], "choices": options, "answer": _gold(doc, options)}}
    return dataset.map(convert, remove_columns=dataset.column_names)
'''


def task_yamls(lm_eval_tasks, data_dir):
    """{benchmark: YAML text} of the local tasks, each including lm-eval's own task file."""
    data = {name: str(Path(data_dir) / b.file) for name, b in benchmarks.BENCHMARKS.items()}
    description = json.dumps(benchmarks.MMLU_DESCRIPTION)
    return {
        "medqa": f"""
            include: {lm_eval_tasks}/medqa/medqa.yaml
            task: local_medqa
            dataset_path: json
            dataset_kwargs: {{data_files: {{test: {data['medqa']}}}}}
            training_split: null
            validation_split: null
            test_split: test
            fewshot_split: test
            fewshot_config: {{sampler: first_n}}
            process_docs: !function adapters.medqa_docs
            doc_to_text: !function adapters.medqa_doc_to_text
            doc_to_target: label
            doc_to_choice: ['A', 'B', 'C', 'D', 'E']
            """,
        "medmcqa": f"""
            include: {lm_eval_tasks}/medmcqa/medmcqa.yaml
            task: local_medmcqa
            dataset_path: json
            dataset_kwargs: {{data_files: {{validation: {data['medmcqa']}}}}}
            training_split: null
            fewshot_split: validation
            fewshot_config: {{sampler: first_n}}
            process_docs: !function adapters.medmcqa_docs
            """,
        "pubmedqa": f"""
            include: {lm_eval_tasks}/pubmedqa/pubmedqa.yaml
            task: local_pubmedqa
            dataset_path: json
            dataset_name: null
            dataset_kwargs: {{data_files: {{test: {data['pubmedqa']}}}}}
            training_split: null
            validation_split: null
            fewshot_split: test
            fewshot_config: {{sampler: first_n}}
            process_docs: !function adapters.pubmedqa_docs
            metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}},
                          {{metric: acc_norm, aggregation: mean, higher_is_better: true}}]
            """,
        "mmlu_clinical": f"""
            include: {lm_eval_tasks}/mmlu/default/_default_template_yaml
            task: local_mmlu_clinical
            dataset_path: json
            dataset_kwargs: {{data_files: {{test: {data['mmlu_clinical']}}}}}
            description: {description}
            fewshot_split: test
            process_docs: !function adapters.mmlu_docs
            """,
    }


def check_medqa_prompt(questions):
    """Our MedQA prompt, cut to four options, is lm-eval's own medqa_4options doc_to_text."""
    from lm_eval.tasks.medqa import preprocess_medqa

    for q in questions:
        lines = q.context.split("\n")
        options = [re.sub(r"^[A-E]\. ", "", line) for line in lines if re.match(r"^[A-E]\. ", line)]
        question = q.context[len("Question: "):q.context.index("\nA. ")]
        theirs = preprocess_medqa.doc_to_text({"sent1": question, **{f"ending{i}": options[i] for i in range(4)}})
        if theirs != benchmarks.medqa_prompt(question, options[:4]):
            return False
    return True


def run_lm_eval(model_path, names, data_dir, limit, num_fewshot, batch_size):
    """lm-eval's logged samples per benchmark: [(doc_id, [(context, continuation)], [loglik])]."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "adapters.py").write_text(ADAPTERS.format(root=str(ROOT)))
        for name, text in task_yamls(lm_eval_tasks, data_dir).items():
            if name in names:
                (Path(folder) / f"local_{name}.yaml").write_text(textwrap.dedent(text))
        out = simple_evaluate(model="hf", model_args=f"pretrained={model_path},dtype=float32", device="cpu",
                              tasks=[f"local_{n}" for n in names], num_fewshot=num_fewshot, limit=limit,
                              batch_size=batch_size, log_samples=True, task_manager=TaskManager(include_path=folder))
    samples = {}
    for name in names:
        rows = []
        for s in sorted(out["samples"][f"local_{name}"], key=lambda s: s["doc_id"]):
            pairs = [(a["arg_0"], a["arg_1"]) for a in (s["arguments"][k] for k in sorted(s["arguments"]))] \
                if isinstance(s["arguments"], dict) else [tuple(a) for a in s["arguments"]]
            rows.append((s["doc_id"], pairs, [float(r[0][0]) for r in s["resps"]]))
        samples[name] = rows
    return samples, out["results"]


def run_ours(model_path, names, data_dir, limit, num_fewshot, batch_size):
    model, tokenizer = benchmarks.load_scoring_model(model_path, dtype="float32", device="cpu")
    ours = {}
    for name in names:
        benchmark = benchmarks.BENCHMARKS[name]
        _, questions = benchmarks.load_benchmark(benchmark, data_dir)
        indices = list(range(min(limit, len(questions))))
        rows = benchmarks.score_benchmark(model, tokenizer, benchmark, questions, indices, num_fewshot, batch_size)
        contexts = [benchmarks.fewshot_context(benchmark, questions, i, num_fewshot) for i in indices]
        ours[name] = (questions, indices, contexts, rows)
    return ours


def compare(theirs, ours):
    """Per benchmark: questions, prompts equal, largest |loglik difference|, same acc / acc_norm answers."""
    report = {}
    for name, samples in theirs.items():
        questions, indices, contexts, rows = ours[name]
        same_prompt, worst, same_pred, same_pred_norm = 0, 0.0, 0, 0
        for (doc_id, pairs, logliks), context, row in zip(samples, contexts, rows):
            choices = row["choices"]
            expected = [(context, benchmarks.TARGET_DELIMITER + c) for c in choices]
            same_prompt += pairs == expected
            worst = max(worst, max(abs(a - b) for a, b in zip(logliks, row["logliks"])))
            pred, pred_norm = benchmarks.predictions(logliks, choices)
            same_pred += choices[pred] == row["pred"]
            same_pred_norm += choices[pred_norm] == row["pred_norm"]
        report[name] = {"questions": len(samples), "same_prompt": same_prompt, "max_abs_loglik_diff": worst,
                        "same_acc_answer": same_pred, "same_acc_norm_answer": same_pred_norm}
    return report


def fixture(theirs, names):
    """lm-eval's contexts and log-likelihoods, for a test that has no lm-eval."""
    return [{"benchmark": name, "index": doc_id, "context": pairs[0][0], "continuations": [c for _, c in pairs],
             "logliks": logliks} for name in names for doc_id, pairs, logliks in theirs[name]]


def first_lines(names, data_dir, limit):
    """The first `limit` lines of each benchmark file: every question and few-shot example the cases use."""
    return {name: (Path(data_dir) / benchmarks.BENCHMARKS[name].file).read_text(encoding="utf-8").split("\n")[:limit]
            for name in names}


def section(reports, command, versions, seconds):
    lines = [f"Command: `{command}`", "", f"Versions: {versions}; {seconds:.0f} s.", "",
             "| benchmark | shots | questions | prompts identical | max abs log-likelihood difference | "
             "same acc answer | same acc_norm answer |", "|---|---|---|---|---|---|---|"]
    for shots, report in reports.items():
        for name, r in report.items():
            lines.append(f"| {name} | {shots} | {r['questions']} | {r['same_prompt']}/{r['questions']} | "
                         f"{r['max_abs_loglik_diff']:.2e} | {r['same_acc_answer']}/{r['questions']} | "
                         f"{r['same_acc_norm_answer']}/{r['questions']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--benchmarks", nargs="+", default=list(benchmarks.BENCHMARKS))
    parser.add_argument("--data_dir", default=str(benchmarks.DATA_DIR))
    parser.add_argument("--limit", type=int, default=8, help="the first N questions of each benchmark")
    parser.add_argument("--num_fewshot", type=int, nargs="+", default=[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--fixture", default=None, help="also write lm-eval's side as a test fixture (JSON)")
    parser.add_argument("--results_md", default=str(ROOT / "docs" / "RESULTS.md"))
    args = parser.parse_args(argv)
    import lm_eval
    import torch
    import transformers

    start = time.perf_counter()
    reports, cases = {}, []
    medqa_ok = None
    for shots in args.num_fewshot:
        theirs, _ = run_lm_eval(args.model_path, args.benchmarks, args.data_dir, args.limit, shots, args.batch_size)
        ours = run_ours(args.model_path, args.benchmarks, args.data_dir, args.limit, shots, args.batch_size)
        reports[shots] = compare(theirs, ours)
        cases += [dict(c, num_fewshot=shots) for c in fixture(theirs, args.benchmarks)]
        if "medqa" in ours and medqa_ok is None:
            medqa_ok = check_medqa_prompt([ours["medqa"][0][i] for i in ours["medqa"][1]])
    seconds = time.perf_counter() - start
    versions = (f"lm-eval {getattr(lm_eval, '__version__', '?')}, transformers {transformers.__version__}, "
                f"torch {torch.__version__}, model `{Path(args.model_path).relative_to(ROOT) if Path(args.model_path).is_relative_to(ROOT) else args.model_path}` in float32 on the CPU")
    if medqa_ok is not None:
        versions += f"; MedQA prompt cut to 4 options identical to lm-eval's medqa_4options: {medqa_ok}"
    command = "python bench/lmeval_equivalence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = section(reports, command, versions, seconds)
    print(text)
    if args.fixture:
        write_json_atomic(args.fixture, {"model": "models/SmolLM2-135M-Instruct (the embedded default)",
                                         "command": command, "versions": versions,
                                         "files": first_lines(args.benchmarks, args.data_dir, args.limit),
                                         "cases": cases})
    replace_markdown_section(args.results_md, text, SECTION_BEGIN, SECTION_END,
                             heading="### Equal to lm-evaluation-harness (`bench/lmeval_equivalence.py`)")
    worst = max(r["max_abs_loglik_diff"] for report in reports.values() for r in report.values())
    same = all(r["same_prompt"] == r["questions"] == r["same_acc_answer"] == r["same_acc_norm_answer"]
               for report in reports.values() for r in report.values())
    return 0 if same and worst <= TOLERANCE and medqa_ok is not False else 1


if __name__ == "__main__":
    sys.exit(main())
