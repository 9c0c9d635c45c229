"""Loss curves as PNG: training loss by step and validation bits per byte by training time."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import is_number


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows, less any that is not a JSON object (a line cut short by an interrupted write)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _with(rows: list[dict], *fields: str) -> list[dict]:
    """The rows that hold a number in each of `fields` (an edited or damaged row is left out of the plot)."""
    return [r for r in rows if all(is_number(r.get(f)) for f in fields)]


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = _with(rows, "step", "loss")
    val = _with(rows, "step", "val_loss", "val_bpb", "train_time")
    if not train and not val:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if train:  # a run shorter than one logging interval has only its validation points
        left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if val:
        left.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="validation loss")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy (nats per token)")
    left.legend()
    left.grid(alpha=0.3)
    if val:
        right.plot([r["train_time"] for r in val], [r["val_bpb"] for r in val], "o-", ms=3, color="C1")
    right.set_xlabel("training time (s)")
    right.set_ylabel("validation bits per byte")
    right.grid(alpha=0.3)
    fig.suptitle(metrics_path.parent.name)
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
