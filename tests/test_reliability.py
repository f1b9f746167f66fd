"""Fault injection and bad input: kills and full disks during training, another run's output_dir, bad flags,
random bytes for the data readers. docs/RELIABILITY.md lists each fault with the test here that proves it."""
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import checkpoints
import train
import utils
from conftest import BAD_FILES, KILL_DURING_SAVE, error_lines, short_records

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_STEPS = 6, 2  # 16 records in batches of 4: the run crosses an epoch boundary at step 4


def run_args(model, data, out, cache, *extra):
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS),
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine",
            "--warmup_steps", "1", "--logging_steps", "1", "--report_to", "none", "--seed", "1",
            "--cache_dir", str(cache), *extra]


def max_weight_difference(a, b):
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """Arguments for a 6-step tiny run in a fresh output_dir; the data and tokenization cache are shared."""
    base = tmp_path_factory.mktemp("reliability")
    data = base / "data.json"
    data.write_text(json.dumps(short_records(16)))

    def make(out_name, *extra):
        return run_args(tiny_model_dir, data, base / out_name, base / "cache", *extra)
    return make


@pytest.fixture(scope="module")
def reference(run):
    """The same run, never interrupted."""
    args = run("reference")
    train.main(args)
    return Path(args[args.index("--output_dir") + 1])


def out_dir(args):
    return Path(args[args.index("--output_dir") + 1])


# ----------------------------------------------------------------------------- kills and full disks

@pytest.mark.slow
def test_sigkill_during_a_save_then_same_command_resumes_to_the_same_weights(run, reference, caplog):
    args = run("killed")
    out = out_dir(args)
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert checkpoints.checkpoint_problem(out / "checkpoint-2") is None
    assert not (out / "checkpoint-4").exists()  # the half-written save has only its temporary name
    assert (out / "tmp-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()

    with caplog.at_level("INFO", logger="chatdoctor"):
        train.main(args)  # the same command again
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert "skipping" in caplog.text and "tmp-checkpoint-4" in caplog.text
    assert max_weight_difference(out, reference) < 1e-4
    assert not list(out.glob("tmp-*"))


def disk_full_when_saving_to(monkeypatch, path_part):
    """torch.save raises ENOSPC for any file whose path contains `path_part`, as a full disk would."""
    real_save = torch.save

    def save(obj, f, *a, **k):
        if path_part in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one_and_resume_works(
        run, reference, monkeypatch, capsys, caplog):
    args = run("diskfull")
    out = out_dir(args)
    disk_full_when_saving_to(monkeypatch, "checkpoint-4")
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "disk full" in line and "resume" in line
    assert checkpoints.checkpoint_problem(out / "checkpoint-2") is None  # the previous good one survives
    assert not (out / "checkpoint-4").exists() and not list(out.glob("tmp-*"))
    assert not (out / "model.safetensors").exists()
    monkeypatch.undo()

    # A checkpoint left incomplete by some other writer (no trainer_state.json) is skipped with a warning.
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    loads = []
    real_load = torch.load

    def spy_load(*a, **k):
        loads.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy_load)
    with caplog.at_level("INFO", logger="chatdoctor"):
        train.main(args)
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert loads and all(w is True for w in loads)  # optimizer, scheduler, RNG: no arbitrary unpickling
    assert max_weight_difference(out, reference) < 1e-4


@pytest.mark.slow
def test_disk_full_during_the_final_save_leaves_no_final_model_and_rerun_finishes(
        run, reference, monkeypatch, capsys):
    args = run("finalfull")
    out = out_dir(args)
    disk_full_when_saving_to(monkeypatch, "tmp-final")
    with pytest.raises(SystemExit):
        train.main(args)
    assert "disk full" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert checkpoints.checkpoint_problem(out / f"checkpoint-{STEPS}") is None
    monkeypatch.undo()

    train.main(args)
    assert max_weight_difference(out, reference) < 1e-4
    assert not list(out.glob("tmp-*")) and not list(out.glob("*.bin"))


@pytest.mark.slow
def test_explicit_resume_from_checkpoint_still_works(run, reference):
    args = run("explicit", "--resume_from_checkpoint", str(reference / f"checkpoint-{STEPS}"))
    train.main(args)
    assert max_weight_difference(out_dir(args), reference) < 1e-4


# ----------------------------------------------------------------------------- what the checkpoint override touches

def best_model_run(run, out_name):
    """--load_best_model_at_end over an eval set, keeping 2 checkpoints. The eval set is the training data and
    --greater_is_better makes the highest eval loss the best: the loss falls as the model learns, so the best
    checkpoint is the first (step 2), never the newest, which is what rotation and loading must both get right."""
    args = run(out_name)
    return args + ["--eval_data_path", args[args.index("--data_path") + 1], "--eval_strategy", "steps",
                   "--eval_steps", str(SAVE_STEPS), "--load_best_model_at_end", "True", "--metric_for_best_model",
                   "loss", "--greater_is_better", "True", "--save_total_limit", "2"]


def checkpoint_names(out):
    return sorted(p.name for p in checkpoints.checkpoint_folders(out))


@pytest.mark.slow
def test_load_best_model_at_end_save_total_limit_and_resume_keep_and_publish_the_best(run, caplog):
    args = best_model_run(run, "best")
    out = out_dir(args)
    best = out / f"checkpoint-{SAVE_STEPS}"
    trainer = train.main(args)
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == STEPS // SAVE_STEPS and evals[0] == max(evals)  # the premise: step 2 is the best
    assert trainer.state.best_model_checkpoint == str(best)  # the published folder, not its staging name
    assert checkpoint_names(out) == [best.name, f"checkpoint-{STEPS}"]  # checkpoint-4 rotated out, the best kept
    for folder in checkpoints.checkpoint_folders(out):
        assert json.loads((folder / "trainer_state.json").read_text())["best_model_checkpoint"] == str(best)
    assert max_weight_difference(out, best) == 0  # the final model is the best checkpoint's
    assert not list(out.glob("tmp-*"))

    # The newest checkpoint lost: the same command resumes from the best one, still knows it is the best,
    # rotates checkpoint-4 out again and publishes the best model again.
    shutil.rmtree(out / f"checkpoint-{STEPS}")
    with caplog.at_level("INFO", logger="chatdoctor"):
        resumed = train.main(args)
    assert f"resuming from {best}" in caplog.text
    assert resumed.state.best_model_checkpoint == str(best)
    assert checkpoint_names(out) == [best.name, f"checkpoint-{STEPS}"]
    assert max_weight_difference(out, best) == 0


def test_a_failing_loss_plot_is_a_warning_and_the_model_is_still_published(run, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import plot_loss

    def no_plot(*args, **kwargs):
        raise RuntimeError("matplotlib: no usable font")

    monkeypatch.setattr(plot_loss, "save_loss_plot", no_plot)
    args = run("noplot", "--max_steps", "2", "--save_strategy", "no")
    out = out_dir(args)
    out.mkdir()
    (out / "loss.png").write_bytes(b"an older model's plot")
    with caplog.at_level("WARNING", logger="chatdoctor"):
        train.main(args)
    assert "loss plot not written (matplotlib: no usable font)" in caplog.text
    assert not (out / "loss.png").exists()  # no stale plot beside the new model
    assert checkpoints.read_fingerprint(out) is not None and not list(out.glob("tmp-*"))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model(**tokenizer(["a headache"], return_tensors="pt")).logits.isfinite().all()


# ----------------------------------------------------------------------------- another run's output_dir

@pytest.mark.slow
def test_output_dir_of_a_different_run_is_refused(run, reference, capsys):
    before = (reference / "model.safetensors").read_bytes()
    args = run("reference")
    args[args.index("--learning_rate") + 1] = "1e-3"
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "holds a finished model" in line and "learning_rate 0.003 -> 0.001" in line
    assert "--overwrite_output_dir" in line
    assert (reference / "model.safetensors").read_bytes() == before


def fingerprint(lr=3e-3, records=({"instruction": "a", "input": "", "output": "b"},)):
    _, _, args = train.parse_args(["--output_dir", "unused", "--learning_rate", str(lr)])
    return checkpoints.run_fingerprint("no-such/model", list(records), args)


def test_output_dir_guard_same_run_other_run_unknown_run_and_overwrite(tmp_path):
    out = tmp_path / "out"
    checkpoints.check_output_dir(out, fingerprint(), overwrite=False)  # new folder: fine
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(checkpoints.OutputDirError, match="no run.json"):
        checkpoints.check_output_dir(out, fingerprint(), overwrite=False)
    checkpoints.write_fingerprint(out, fingerprint())
    checkpoints.check_output_dir(out, fingerprint(), overwrite=False)  # same run: resumed
    with pytest.raises(checkpoints.OutputDirError, match="other data"):
        checkpoints.check_output_dir(out, fingerprint(records=[{"instruction": "x", "output": "y"}]), overwrite=False)
    with pytest.raises(checkpoints.OutputDirError, match="learning_rate"):
        checkpoints.check_output_dir(out, fingerprint(lr=1e-4), overwrite=False)
    checkpoints.check_output_dir(out, fingerprint(lr=1e-4), overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(checkpoints.OutputDirError, match="not a directory"):
        checkpoints.check_output_dir(tmp_path / "afile", fingerprint(), overwrite=True)


def fake_checkpoint(folder, step, fp):
    """A checkpoint folder with the files resume needs (weights as a real, tiny safetensors file)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(3)}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "optimizer.pt").write_bytes(b"x")
    (folder / "scheduler.pt").write_bytes(b"x")
    checkpoints.write_fingerprint(folder, fp)
    return folder


def test_resume_picks_the_newest_complete_checkpoint_of_this_run(tmp_path, caplog):
    fp = fingerprint()
    good = fake_checkpoint(tmp_path / "checkpoint-2", 2, fp)
    truncated = fake_checkpoint(tmp_path / "checkpoint-4", 4, fp)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    no_shard = fake_checkpoint(tmp_path / "checkpoint-6", 6, fp)
    (no_shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-2.safetensors"}}))
    bad_state = fake_checkpoint(tmp_path / "checkpoint-8", 8, fp)
    (bad_state / "trainer_state.json").write_text('{"global_st')
    fake_checkpoint(tmp_path / "checkpoint-10", 10, fingerprint(lr=1.0))
    (tmp_path / "tmp-checkpoint-12").mkdir()
    with caplog.at_level("WARNING", logger="chatdoctor"):
        assert checkpoints.find_resume_checkpoint(tmp_path, fp) == str(good)
    for expected in ("checkpoint-4: model.safetensors is truncated", "checkpoint-6: missing weight shard",
                     "checkpoint-8: trainer_state.json missing", "checkpoint-10: it is from a different run",
                     "tmp-checkpoint-12: a save that was interrupted"):
        assert expected in caplog.text


def test_explicit_incomplete_checkpoint_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(short_records(4)))
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_model_dir, data, tmp_path / "out", tmp_path / "cache",
                            "--resume_from_checkpoint", str(tmp_path / "checkpoint-3")))
    [line] = error_lines(capsys.readouterr().err)
    assert "incomplete checkpoint (trainer_state.json missing" in line


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("flags, expected", [
    (["--learning_rte", "1e-3"], "unknown flag: --learning_rte (did you mean --learning_rate?)"),
    (["--num_train_epocs", "3", "--bogus"], "--num_train_epocs (did you mean --num_train_epochs?), --bogus"),
    (["--learning_rate", "0"], "--learning_rate must be > 0, got 0.0"),
    (["--learning_rate=-1e-5"], "--learning_rate must be > 0, got -1e-05"),
    (["--learning_rate", "nan"], "--learning_rate must be > 0, got nan"),
    (["--learning_rate", "abc"], "invalid float value: 'abc'"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
    (["--model_max_length", "8"], "--model_max_length 8 is too short"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
    (["--eval_strategy", "steps"], "--eval_strategy steps needs held-out data: pass --eval_data_path"),
])
def test_bad_flags_are_one_line_before_any_work(flags, expected, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output_dir", str(out), "--model_name_or_path", str(tmp_path / "not-read"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert expected in line and "Traceback" not in err and "usage:" not in err
    assert not out.exists()


def test_model_max_length_shorter_than_the_prompt_template(tokenizer):
    with pytest.raises(train.ArgumentsError, match="prompt template alone takes"):
        train.check_prompt_fits(tokenizer, 24)
    train.check_prompt_fits(tokenizer, 64)


def test_unwritable_output_dir_parent_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(checkpoints.OutputDirError, match="not a writable directory"):
        checkpoints.check_output_dir(tmp_path / "file" / "out", fingerprint(), overwrite=False)


# ----------------------------------------------------------------------------- bad data through the command

@pytest.mark.parametrize("name", sorted(BAD_FILES) + ["latin1.json", "a-directory"])
def test_every_bad_data_file_is_one_line_from_the_command_and_nothing_written(name, tiny_model_dir, tmp_path, capsys):
    path = tmp_path / name
    if name == "latin1.json":
        path.write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    elif name == "a-directory":
        path.mkdir()
    elif BAD_FILES[name][0] is not None:
        path.write_text(BAD_FILES[name][0], encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(path), "--output_dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert str(path) in line and "Traceback" not in err
    assert not out.exists()


def test_unreadable_data_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.json"
    path.write_text('[{"instruction": "a", "output": "b"}]')

    real_open = os.open

    def permission_denied(file, *args, **kwargs):  # chmod 000 does not stop root, who runs CI containers
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", permission_denied)
    with pytest.raises(utils.DataError, match=r"secret.json: cannot read file \(Permission denied\)"):
        utils.load_records(path)


# ----------------------------------------------------------------------------- random bytes for the readers

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
field_values = st.none() | st.integers() | st.text(max_size=20) | st.lists(st.text(max_size=3), max_size=2)
record_like = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "answer_icliniq", "question"]), field_values, max_size=4)


def _json_bytes(value, draw_lines):
    if draw_lines and isinstance(value, list):
        return "\n".join(json.dumps(v) for v in value).encode()
    return json.dumps(value).encode()


@st.composite
def jsonish_bytes(draw):
    """Random bytes, random JSON, lists of near-records, as JSON or JSONL, sometimes cut or corrupted."""
    kind = draw(st.sampled_from(["bytes", "json", "records"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    value = draw(json_values) if kind == "json" else draw(st.lists(record_like, max_size=4))
    data = _json_bytes(value, draw(st.booleans()))
    cut = draw(st.none() | st.integers(0, max(len(data), 1)))
    data = data if cut is None else data[:cut]
    if draw(st.booleans()) and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at + 1:]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=jsonish_bytes(), suffix=st.sampled_from([".json", ".jsonl"]))
@example(data=b"[" * 100_000, suffix=".json")
@example(data=b'{"a":' * 100_000, suffix=".jsonl")
@example(data=b'[{"instruction": "\\ud800", "output": "x"}]', suffix=".json")
@example(data=b"\xef\xbb\xbf[]", suffix=".json")
def test_data_readers_return_valid_records_or_raise_data_error(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            records = utils.load_records(path)
        except utils.DataError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path))
            return
    assert records and all(set(r) == {"instruction", "input", "output"} for r in records)
    for record in records:
        for value in record.values():
            assert isinstance(value, str)
            value.encode("utf-8")  # a tokenizer can take it
