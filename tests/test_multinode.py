"""Two nodes on 127.0.0.1: two torchrun launches with `make recipe NNODES=2`'s launcher flags (torchrun's c10d
rendezvous, one gloo process a node) train the tiny LLaMA as one DDP job. What a multi-node user relies on: the
nodes split every global batch into disjoint halves, the losses are a single process's at the same global batch,
global rank 0 alone publishes one folder that plain transformers loads, the loss of one node stops the other within
seconds, and the same commands again resume from the last complete checkpoint."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import train
from conftest import ROOT, short_records

# A node's worker: train.main, where NODE_DIES_AT_STEP makes the whole node vanish (its torchrun agent and this
# worker, SIGKILL) as that step begins, and where the final folder's publication is announced.
NODE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import checkpoints, train
die_at = int(os.environ.get("NODE_DIES_AT_STEP", "0"))
training_step = train.ChatDoctorTrainer.training_step
def step_or_die(self, model, inputs, num_items_in_batch=None):
    if self.state.global_step + 1 == die_at:
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return training_step(self, model, inputs, num_items_in_batch)
train.ChatDoctorTrainer.training_step = step_or_die
publish_files = checkpoints.publish_files
def announced(staged, final_dir):
    print(f"final folder published by global rank {{os.environ['RANK']}}", flush=True)
    return publish_files(staged, final_dir)
checkpoints.publish_files = announced
train.main(sys.argv[1:])
"""
STEPS, SAVE_STEPS, DIES_AT = 4, 2, 3
NODE_STOP_SECONDS = 60  # measured by hand: 1.6-5.2 s from one node's death to the other's exit


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_launcher(node_rank, port):
    """The torchrun flags `make recipe NNODES=2 NODE_RANK=... MASTER_ADDR=127.0.0.1` runs stage 1 with (make -n)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    printed = subprocess.run(["make", "-n", "recipe", "NNODES=2", f"NODE_RANK={node_rank}", "MASTER_ADDR=127.0.0.1",
                              f"MASTER_PORT={port}", "NGPUS=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout
    words = shlex.split(next(line for line in printed.splitlines() if "torchrun" in line).rstrip("\\"))
    start = next(i for i, w in enumerate(words) if w.endswith("torchrun")) + 1
    return words[start:words.index("train.py")]


def launch_two_nodes(script, args, logs, dies_at=0, workdirs=(ROOT, ROOT)):
    """Node 0 and node 1 as two torchrun launches; node 1 dies at step `dies_at` (0: never). Each runs in its
    workdir: two workdirs and a relative --output_dir are two hosts that do not share that folder."""
    port, nodes = free_port(), []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NODE_DIES_AT_STEP": str(dies_at if rank == 1 else 0)}
        cmd = [sys.executable, "-m", "torch.distributed.run", *recipe_launcher(rank, port), str(script), *args]
        log = open(logs / f"node{rank}.log", "w")
        nodes.append(subprocess.Popen(cmd, cwd=workdirs[rank], env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return nodes


def stop(nodes):
    for node in nodes:
        if node.poll() is None:
            node.terminate()  # the agent passes it on to its worker
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.kill()


def data_order(folder, rank):
    """{step: examples rank trained on in that step}, from the latest run that trained the step."""
    latest = {}
    for line in (folder / f"rank-{rank}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        run, examples = latest.get(entry["step"], (None, []))
        if run != entry["run_started"]:
            run, examples = entry["run_started"], []
        latest[entry["step"]] = (run, examples + entry["examples"])
    return {step: examples for step, (_, examples) in latest.items()}


def losses(log_history):
    return {e["step"]: e["loss"] for e in log_history if "loss" in e}


@pytest.fixture()
def common_args(tiny_model_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(short_records(64)))
    return ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--max_steps", str(STEPS),
            "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3", "--logging_steps", "1",
            "--report_to", "none", "--cache_dir", str(tmp_path / "cache"), "--seed", "1"]


@pytest.fixture()
def node_script(tmp_path):
    script = tmp_path / "node.py"
    script.write_text(NODE.format(root=str(ROOT)))
    return script


# Per node: batch 2 x 2 accumulation, so a global batch of 8 over the two nodes.
def node_args(common_args, out, order):
    return [*common_args, "--output_dir", str(out), "--per_device_train_batch_size", "2", "--save_strategy", "steps",
            "--save_steps", str(SAVE_STEPS), "--data_order_log", str(order)]


@pytest.mark.slow
def test_two_nodes_train_as_one_job_stop_together_and_resume(common_args, node_script, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One process at the same global batch: 4 x 2 accumulation.
    single = train.train([*common_args, "--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size",
                          "4", "--save_strategy", "no", "--data_order_log", str(tmp_path / "single-order")])
    out, order = tmp_path / "out", tmp_path / "order"
    script, node_args_ = node_script, node_args(common_args, out, order)

    killed_logs, resumed_logs = tmp_path / "killed", tmp_path / "resumed"
    killed_logs.mkdir(), resumed_logs.mkdir()
    nodes = launch_two_nodes(script, node_args_, killed_logs, dies_at=DIES_AT)
    try:
        assert nodes[1].wait(timeout=300) == -signal.SIGKILL, (killed_logs / "node1.log").read_text()[-3000:]
        died = time.monotonic()
        nodes[0].wait(timeout=NODE_STOP_SECONDS)
        stopped_after = time.monotonic() - died
    finally:
        stop(nodes)
    log0 = (killed_logs / "node0.log").read_text()
    assert nodes[0].returncode != 0 and stopped_after < NODE_STOP_SECONDS
    assert "error: lost contact with another rank" in log0 and "resume from the last complete checkpoint" in log0
    assert "2 nodes (this one: global rank" in log0
    assert checkpoints.checkpoint_problem(out / f"checkpoint-{SAVE_STEPS}") is None
    assert not (out / "model.safetensors").exists() and not (out / f"checkpoint-{STEPS}").exists()

    nodes = launch_two_nodes(script, node_args_, resumed_logs)  # the same commands again
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        stop(nodes)
    logs = [(resumed_logs / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert all(f"resuming from {out / f'checkpoint-{SAVE_STEPS}'}" in log for log in logs)

    # Every global batch split into disjoint halves, together the single process's batch.
    alone = data_order(tmp_path / "single-order", 0)
    ranks = [data_order(order, rank) for rank in (0, 1)]
    assert sorted(alone) == sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, STEPS + 1))
    for step in alone:
        assert len(ranks[0][step]) == len(ranks[1][step]) == 4 and not set(ranks[0][step]) & set(ranks[1][step])
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(alone[step])

    # The losses, steps 1-2 from the killed run's checkpoint and 3-4 from the resumed run, are the single process's.
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    together, one = losses(state["log_history"]), losses(single.state.log_history)
    assert sorted(together) == sorted(one) == list(range(1, STEPS + 1))
    assert [together[s] for s in one] == pytest.approx([one[s] for s in one], rel=1e-6)  # measured: 1e-7

    # One folder, published once, by global rank 0; plain transformers loads the single process's model from it.
    published = [line for log in logs for line in log.splitlines() if line.startswith("final folder published")]
    assert published == ["final folder published by global rank 0"]
    assert not list(out.glob(f"{checkpoints.STAGING_PREFIX}*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    x = AutoTokenizer.from_pretrained(out)(["Doctor, I have a headache."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, single.model.to("cpu").eval()(**x).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_node_that_does_not_see_the_checkpoints_is_refused_before_training(common_args, node_script, tmp_path):
    """Two hosts whose output_dir is not one shared folder: one finds a checkpoint, the other none. Resuming on one
    and starting afresh on the other would train from two states; both stop before training with one line."""
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    for host in hosts:
        host.mkdir()
    # This very run's checkpoints (world size is not part of a run's fingerprint) on host 0 only, as a run killed
    # after checkpoint-2 leaves them.
    train.train(node_args(common_args, hosts[0] / "out", tmp_path / "single-order"))
    shutil.rmtree(hosts[0] / "out" / f"checkpoint-{STEPS}")
    (hosts[0] / "out" / "model.safetensors").unlink()
    args = node_args(common_args, "out", tmp_path / "order")  # relative: host0/out and host1/out

    nodes = launch_two_nodes(node_script, args, tmp_path, workdirs=hosts)
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        stop(nodes)
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes[0] != 0 and codes[1] != 0
    for log in logs:
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, log[-3000:]
        assert f"checkpoint-{SAVE_STEPS}" in errors[0] and ": none" in errors[0]
        assert "filesystem that every node mounts" in errors[0]
    assert not (tmp_path / "order" / "rank-1.jsonl").exists()  # refused before any step


def test_data_order_log_names_each_example_once_an_epoch_and_changes_no_loss(common_args, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("logged", ["--data_order_log", str(tmp_path / "order")])):
        trainer = train.train([*common_args, "--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "4",
                               "--max_steps", "8", "--save_strategy", "no", *extra])  # 8 x 4 x 2 = 64: one epoch
        runs[name] = losses(trainer.state.log_history)
    assert runs["logged"] == runs["plain"]
    lines = [json.loads(line) for line in (tmp_path / "order" / "rank-0.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [step for step in range(1, 9) for _ in range(2)]  # 2 accumulated
    assert all(len(line["examples"]) == 4 and line["rank"] == 0 for line in lines)
    assert sorted(i for line in lines for i in line["examples"]) == list(range(64))
