"""The eval sets the retriever is tuned and judged on: data/lay_questions.json and data/non_diagnosis_questions.json."""
import json
import sys
from pathlib import Path

from utils import load_records

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import tune_knowledge  # noqa: E402

LAY = ROOT / "data" / "lay_questions.json"
NON_DIAGNOSIS = ROOT / "data" / "non_diagnosis_questions.json"


def test_the_lay_set_has_a_tuning_and_a_held_out_part_for_every_body_system():
    records = load_records(LAY)
    assert len(records) >= 100
    parts = {part: [r for r in records if r["split"] == part] for part in ("tuning", "heldout")}
    assert len(parts["heldout"]) >= 40 and len(parts["tuning"]) >= 40
    raw = json.loads(LAY.read_text(encoding="utf-8"))
    for system in {r["system"] for r in raw}:
        assert {r["split"] for r in raw if r["system"] == system} == {"tuning", "heldout"}, system
    assert not {r["input"] for r in parts["tuning"]} & {r["input"] for r in parts["heldout"]}


def test_tuning_reads_no_held_out_message():
    for path in (LAY, NON_DIAGNOSIS):
        held_out = {r["input"] for r in load_records(path) if r["split"] == "heldout"}
        tuning = tune_knowledge.tuning_part(path)
        assert tuning and all(r["split"] == "tuning" for r in tuning)
        assert not {r["input"] for r in tuning} & held_out


def test_non_diagnosis_questions_have_references_in_both_parts():
    records = load_records(NON_DIAGNOSIS)
    assert len(records) >= 50 and all(len(r["output"].split()) >= 15 for r in records)
    assert {r["split"] for r in records} == {"tuning", "heldout"}
