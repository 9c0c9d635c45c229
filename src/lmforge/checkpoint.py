"""Run folders on disk: config JSON, safetensors weights, tokenizer, and the state to resume training.

Everything is written to a temporary name and then renamed into place, so an interrupted write
never leaves a half checkpoint, and nothing is ever unpickled on load.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RunConfig, read_json
from .errors import LmforgeError
from .models import build_model
from .tokenizers import load_tokenizer

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
RESUME = "last"  # folder with the latest weights, optimizer and trainer state


def write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file, flushed to disk, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LmforgeError(f"{path} is missing; the run folder is incomplete (re-run training)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LmforgeError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); "
                           f"re-run training or restore it from a copy") from None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the unwrapped module (never a torch.compile or DDP wrapper's prefixed names)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return model.state_dict()


def open_run_dir(out: Path, resume: bool) -> Path:
    """The run folder to train into: an existing run when resuming, else a new or empty folder."""
    out = Path(out)
    if resume:
        read_config(out)  # fails clearly when it is not a run
        return out
    if (out / CONFIG).exists():
        raise LmforgeError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"{out} exists and is not an empty folder; choose another --out (nothing was written)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(f"cannot create the run folder {out}: {e.strerror or e}; choose another --out") from None
    return out


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written. Opened for a resumed run, it first
    drops the rows written after the resume point (the interrupted run's last steps are trained again)."""

    def __init__(self, path: Path, after_step: int = 0, write: bool = True):
        self.file = None
        if not write:
            return
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write
                if isinstance(row, dict) and row.get("step", 0) <= after_step:
                    keep.append(line + "\n")
            write_text(path, "".join(keep))
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def save_config(run_dir: Path, config: RunConfig, model_fields: dict, extra: dict | None = None) -> None:
    data = {"format_version": FORMAT_VERSION, **config.to_dict()}
    data["model"] = {"arch": config.model.arch, "options": model_fields}
    data.update(extra or {})
    write_json(run_dir / CONFIG, data)


def read_config(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmforgeError(f"run folder {run_dir} does not exist; train one with `lmforge train --out {run_dir}`")
    if not (run_dir / CONFIG).exists():
        raise LmforgeError(f"{run_dir} is not an lmforge run (no {CONFIG}); "
                           f"point at a folder made by `lmforge train`")
    data = read_json(run_dir / CONFIG, "run config")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise LmforgeError(f"{run_dir} has format_version {version}; this lmforge reads {FORMAT_VERSION}")
    return data


def build_from_config(data: dict) -> torch.nn.Module:
    return build_model(data["model"]["arch"], **data["model"]["options"])


def load_model(run_dir: Path, weights: Path | None = None) -> tuple[torch.nn.Module, object, dict]:
    """(model in eval mode on the CPU, tokenizer, config dict) from a run folder."""
    run_dir = Path(run_dir)
    data = read_config(run_dir)
    model = build_from_config(data)
    state = load_tensors(weights or run_dir / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LmforgeError(f"{run_dir / WEIGHTS} does not match its config.json "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if not (run_dir / "tokenizer.json").exists():
        raise LmforgeError(f"{run_dir} has no tokenizer.json; the run folder is incomplete")
    tokenizer = load_tokenizer(run_dir)
    return model.eval(), tokenizer, data


# ---- resume state -------------------------------------------------------------------------------

def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and plain JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict, plain: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(plain["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_resume(run_dir: Path, model, optimizers: list, trainer_state: dict) -> None:
    """Write weights + optimizer + trainer state as one unit: a temp folder swapped into place."""
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / (RESUME + ".tmp"), run_dir / RESUME, run_dir / (RESUME + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(tmp / WEIGHTS, model_state(model))
    plain = []
    for i, opt in enumerate(optimizers):
        tensors, rest = _flatten_optimizer(opt)
        save_tensors(tmp / f"optimizer{i}.safetensors", tensors)
        plain.append(rest)
    write_json(tmp / "trainer_state.json", {**trainer_state, "optimizers": plain})
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_resume(run_dir: Path, model, optimizers: list, log=print) -> dict:
    """Restore weights and optimizer state in place; return the trainer state. (Random draws are
    functions of the seed and the step, so no generator state is saved.)"""
    run_dir = Path(run_dir)
    folder = run_dir / RESUME
    if not folder.exists() and (run_dir / (RESUME + ".old")).exists():
        folder = run_dir / (RESUME + ".old")  # interrupted between the two renames
    if not folder.exists():
        raise LmforgeError(f"{run_dir} has no resume state ({RESUME}/); it was not saved by `lmforge train`")
    state = read_json(folder / "trainer_state.json", "trainer state")
    model.load_state_dict(load_tensors(folder / WEIGHTS))
    plain = state.pop("optimizers")
    if len(plain) != len(optimizers):
        raise LmforgeError(f"{run_dir} was trained with {len(plain)} optimizer(s), this config builds "
                           f"{len(optimizers)}; resume with the run's own train.optimizer")
    for i, opt in enumerate(optimizers):
        tensors = load_tensors(folder / f"optimizer{i}.safetensors")
        opt.load_state_dict(_unflatten_optimizer(tensors, plain[i]))
    return state
