"""Precision and recall of clean.py's name removal on the labelled set tests/fixtures/names_labelled.jsonl
(HealthCareMagic- and iCliniq-style texts with every person name marked; tests/fixtures/make_names_labelled.py).

    python bench/bench_clean_names.py                                  # prints the table and JSON
    python bench/bench_clean_names.py --results_md docs/RESULTS.md     # and writes its section there

A labelled name counts as found when every character of it lies inside a span clean.py removes; a removed span
counts as right when it overlaps a labelled name. "Eponyms kept" counts the medical eponyms of the set
(Parkinson's disease, Down syndrome, ...) left untouched in the cleaned text.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clean  # noqa: E402
from utils import replace_markdown_section  # noqa: E402

LABELLED = ROOT / "tests" / "fixtures" / "names_labelled.jsonl"
EPONYM_PHRASE = re.compile(r"\b(?:[A-Z][a-z]+(?:'s|s'|')?\s+(?:disease|syndrome|palsy|thyroiditis|lymphoma|smear|"
                           r"maneuver|monitor)|Alzheimer's|Allegra|Crocin)\b")


def score(records, finder):
    found = labelled = right = removed = leaks = 0
    eponyms = eponyms_kept = 0
    by_site, misses, false_alarms = {}, [], []
    for record in records:
        text, names = record["text"], record["names"]
        spans = finder.find(text)
        covered = set()
        for start, end, _ in spans:
            covered.update(range(start, end))
        hits = sum(all(i in covered for i in range(a, b)) for a, b in names)
        good = sum(any(a < end and start < b for a, b in names) for start, end, _ in spans)
        found, labelled, right, removed = found + hits, labelled + len(names), right + good, removed + len(spans)
        site = by_site.setdefault(record["site"], {"records": 0, "names": 0, "found": 0, "removed": 0,
                                                      "right": 0})
        site["records"] += 1
        site["names"] += len(names)
        site["found"] += hits
        site["removed"] += len(spans)
        site["right"] += good
        for a, b in names:
            if not all(i in covered for i in range(a, b)):
                misses.append(f"{record['id']}: {text[a:b]!r} in {clean.snippet(text, a, b, 40)!r}")
        for start, end, kind in spans:
            if not any(a < end and start < b for a, b in names):
                false_alarms.append(f"{record['id']}: {text[start:end]!r} ({kind})")
        cleaned = clean.redact_names(text, spans, clean.NAME_PLACEHOLDER)
        leaks += any(re.search(rf"\b{re.escape(text[a:b])}\b", cleaned) and text[a:b] not in finder.eponyms
                     for a, b in names)
        for m in EPONYM_PHRASE.finditer(text):
            if not any(a <= m.start() < b for a, b in names) and not any(
                    m.start() < end and start < m.end() for start, end, _ in spans if
                    not any(a < end and start < b for a, b in names)):
                eponyms += 1
                eponyms_kept += m.group(0) in cleaned
    return {
        "records": len(records), "names": labelled, "found": found, "removed_spans": removed, "right_spans": right,
        "precision": round(right / removed, 4) if removed else None,
        "recall": round(found / labelled, 4) if labelled else None,
        "records_with_a_name_left": leaks, "eponyms": eponyms, "eponyms_kept": eponyms_kept,
        "by_site": by_site, "misses": misses, "false_alarms": false_alarms,
    }


def table(result):
    lines = ["| set | records | names | precision | recall |", "|---|---:|---:|---:|---:|"]
    for site, s in result["by_site"].items():
        precision = f"{s['right'] / s['removed']:.3f}" if s["removed"] else "-"
        recall = f"{s['found'] / s['names']:.3f}" if s["names"] else "-"
        lines.append(f"| {site} | {s['records']} | {s['names']} | {precision} | {recall} |")
    lines.append(f"| **all** | {result['records']} | {result['names']} | **{result['precision']:.3f}** | "
                 f"**{result['recall']:.3f}** |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labelled", default=str(LABELLED))
    parser.add_argument("--results_md", help="write the section into this markdown file")
    args = parser.parse_args()
    records = [json.loads(line) for line in Path(args.labelled).read_text(encoding="utf-8").splitlines() if line]
    finder = clean.NameFinder(clean.Dictionaries())
    result = score(records, finder)
    print(json.dumps(result, indent=1))
    print(table(result))
    if args.results_md:
        section = "\n".join([
            "Command: `python bench/bench_clean_names.py --results_md docs/RESULTS.md` on "
            f"`{Path(args.labelled).relative_to(ROOT) if Path(args.labelled).is_relative_to(ROOT) else args.labelled}` "
            f"({result['records']} records, {result['names']} marked names).", "",
            table(result), "",
            f"Records whose cleaned text still holds a marked name: {result['records_with_a_name_left']} of "
            f"{result['records']}. Medical eponyms kept: {result['eponyms_kept']} of {result['eponyms']}.", "",
            "Missed names:", "", *([f"- `{m}`" for m in result["misses"]] or ["- none"]), "",
            "Removed words that are not names:", "", *([f"- `{m}`" for m in result["false_alarms"]] or ["- none"]),
        ])
        replace_markdown_section(args.results_md, section, "<!-- clean-names:begin -->", "<!-- clean-names:end -->",
                                 heading="## Name removal in clean.py (`bench/bench_clean_names.py`)")


if __name__ == "__main__":
    main()
