"""Training loss against step, from a Trainer's log history.

    python plot_loss.py pretrained/trainer_state.json               # writes pretrained/loss.png
    python plot_loss.py models/stage1/trainer_state.json --out stage1-loss.png

train.py calls save_loss_plot(trainer.state.log_history, output_dir / "loss.png") once the model is published.
"""
import argparse
import io
import json
from pathlib import Path

from utils import DataError, fail, write_atomic


def loss_points(log_history, key="loss"):
    """(step, value) pairs of one logged quantity: 'loss' (training) or 'eval_loss'."""
    return [(e["step"], e[key]) for e in log_history if isinstance(e, dict) and key in e and "step" in e]


def save_loss_plot(log_history, png_path, title=None):
    """Write the training (and, when logged, evaluation) loss curve to `png_path`.

    Returns the path, or None when the history holds no per-step loss (e.g. logging_steps larger than
    the run); training is not failed for a missing plot.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    train, evals = loss_points(log_history, "loss"), loss_points(log_history, "eval_loss")
    if not train and not evals:
        return None
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 50 else None, label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="evaluation loss")
    epochs = [e["epoch"] for e in log_history if isinstance(e, dict) and "epoch" in e]
    ax.set_xlabel("step" + (f" (last epoch {epochs[-1]:.2f})" if epochs else ""))
    ax.set_ylabel("loss")
    ax.set_title(title or "Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_atomic(png_path, buffer.getvalue())  # a reader never sees half a PNG


def read_log_history(state_path):
    path = Path(state_path)
    if path.is_dir():
        path = path / "trainer_state.json"
    if not path.is_file():
        raise DataError(f"{path}: trainer_state.json not found")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise DataError(f"{path}: no 'log_history' list, not a Trainer state file")
    return path, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trainer_state", help="trainer_state.json (or the folder holding it)")
    parser.add_argument("--out", default=None, help="PNG to write (default: loss.png beside the state file)")
    args = parser.parse_args(argv)
    try:
        path, history = read_log_history(args.trainer_state)
    except DataError as e:
        fail(str(e))
    out = Path(args.out) if args.out else path.parent / "loss.png"
    if save_loss_plot(history, out, title=f"Training loss: {path.parent.name}") is None:
        fail(f"{path}: log_history holds no 'loss' entries (was logging_steps larger than the run?)")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
