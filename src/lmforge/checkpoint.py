"""Run folders on disk: config JSON, safetensors weights, tokenizer, metrics and resume points.

Every file is written whole or not at all (a temporary name, flushed to disk, renamed over the old
one), so a killed process never leaves half a file; a resume point is a folder renamed into place
as a unit. Every safetensors file carries a SHA-256 of its tensors in its own header, and every
folder a manifest of its JSON files' checksums, so a truncated or bit-flipped file is named when
it is read instead of producing garbage. Nothing is ever unpickled.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import RunConfig, read_json
from .errors import LmforgeError, shell_join
from .models import build_model
from .tokenizers import load_tokenizer

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
AVERAGE = "average.safetensors"  # a resume point's weight average (train.ema)
CHECKPOINTS = "checkpoints"  # resume points: checkpoints/step-00000500/
SUMMARY = "summary.json"  # a finished run's figures
LEGACY_RESUME = "last"  # the single resume point of runs from before checkpoints/
LOCK = "run.lock"  # held while a process trains into the folder
LEFTOVERS = (LOCK, "tokenizer.json", ".lmforge-write-test")  # what a start leaves before config.json
CHECKSUM = "lmforge.sha256"  # safetensors metadata key: SHA-256 of the tensors


# ---- writing and reading files ------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path: Path, exc: OSError, after: str = "") -> LmforgeError:
    """A one-line error for a failed write, saying what it means for what was already there."""
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return LmforgeError(f"cannot write {path}: {reason}{'; ' + after if after else ''}")


def write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file, flushed to disk, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc, f"the previous {path.name} is unchanged") from None
    _fsync_dir(path.parent)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A safetensors file, written atomically, with the SHA-256 of its tensors in its header."""
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata={**(metadata or {}), CHECKSUM: tensor_digest(tensors)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())  # safetensors makes files for the owner only; others read the JSON beside it
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc, f"the previous {path.name} is unchanged") from None
    except SafetensorError as exc:  # the Rust writer reports a full disk as its own error
        tmp.unlink(missing_ok=True)
        raise LmforgeError(f"cannot write {path}: {exc}; the previous {path.name} is unchanged") from None
    _fsync_dir(path.parent)


@functools.cache
def _file_mode() -> int:
    """The permissions a file created here normally gets: rw for all, less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against the checksum in its header."""
    path = Path(path)
    if not path.exists():
        _not_yet(path)
        raise LmforgeError(f"{path} is missing; the run folder is incomplete (re-run training)")
    try:
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get(CHECKSUM)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LmforgeError(f"{path} is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           f"restore it from a copy or re-run training") from None
    if expected is not None and tensor_digest(tensors) != expected:
        raise LmforgeError(f"{path} is damaged: its tensors do not match the checksum written with them "
                           f"(flipped bits or a bad copy); restore it from a copy or re-run training")
    return tensors


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def write_manifest(folder: Path, names: list[str]) -> None:
    """manifest.json: the SHA-256 and size of the named JSON files of `folder` (safetensors files
    carry their own checksums)."""
    files = {}
    for name in names:
        data = (folder / name).read_bytes()
        files[name] = _file_entry(data)
    write_json(folder / MANIFEST, {"format_version": FORMAT_VERSION, "files": files})


def _file_entry(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def replace_listed(folder: Path, name: str, text: str) -> None:
    """Rewrite a file the manifest lists, never leaving the pair mismatched: the manifest first accepts
    the old and new contents, then the file changes, then the manifest holds the new one alone. An
    interruption at any point leaves a file the manifest accepts."""
    path = folder / MANIFEST
    manifest = read_json(path, "manifest") if path.exists() else None
    if manifest is None or name not in (manifest.get("files") or {}):
        write_text(folder / name, text)
        return
    old = manifest["files"][name]
    new = _file_entry(text.encode("utf-8"))
    write_json(path, {**manifest, "files": {**manifest["files"], name: {**new, "or": [old]}}})
    write_text(folder / name, text)
    write_json(path, {**manifest, "files": {**manifest["files"], name: new}})


def check_manifest(folder: Path) -> None:
    """Fail in one line naming the file when a file the manifest lists is missing or changed."""
    path = folder / MANIFEST
    if not path.exists():
        return  # runs from before manifests
    try:
        manifest = read_json(path, "manifest")
    except LmforgeError as e:
        raise LmforgeError(f"{e}; restore it from a copy or re-run training") from None
    for name, entry in (manifest.get("files") or {}).items():
        file = folder / name
        if not file.exists():
            _not_yet(file)
            raise LmforgeError(f"{file} is missing; the run folder is incomplete (restore it or re-run training)")
        accepted = [entry] + list(entry.get("or") or []) if isinstance(entry, dict) else []
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if not any(isinstance(e, dict) and e.get("sha256") == digest for e in accepted):
            raise LmforgeError(f"{file} is damaged: it does not match its checksum in {MANIFEST}; restore it from "
                               f"a copy or re-run training")


# ---- run folders --------------------------------------------------------------------------------------

def open_run_dir(out: Path, resume: bool) -> Path:
    """The run folder to train into: an existing run when resuming, else a new or empty folder."""
    out = Path(out)
    if resume:
        imported = "imported" in read_config(out)  # fails clearly when it is not a run
        check_manifest(out)
        if (out / CHECKPOINTS).exists() and not (out / CHECKPOINTS).is_dir():
            raise LmforgeError(f"{out / CHECKPOINTS} is a file, where the run keeps its resume points; move it "
                               f"away, then resume (nothing was written)")
        # without a resume point a run trains again from the start: right for one killed before its first,
        # not for a finished run (which always saved one) or an imported model (which never had one)
        if (imported or (out / SUMMARY).exists()) and not resume_points(out):
            what = "was imported, so it has no resume points" if imported else \
                f"finished training and its resume points ({CHECKPOINTS}/) are gone"
            raise LmforgeError(f"{out} {what}: --resume would train it again from the start over its {WEIGHTS}; "
                               f"to train it further, fine-tune it (`{shell_join(['lmforge', 'finetune', out])} "
                               f"--data TEXT --mode full --out NEW`)")
        return out
    if (out / CONFIG).exists():
        if not _lmforge_config(out / CONFIG):
            raise LmforgeError(f"{out} holds a {CONFIG} that lmforge did not write; choose another --out "
                               f"(nothing was written)")
        holder = training_process(out)
        if holder is not None:  # --resume would be refused too while that process runs
            raise LmforgeError(f"{out} is in use by lmforge process {holder}, which is training it; "
                               f"choose another --out")
        raise LmforgeError(f"{out} already holds a run; continue it with `{resume_command(out)}` or choose another "
                           f"--out")
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} is a file; --out names the folder a run is written to: choose another --out "
                           f"(nothing was written)")
    # what a start killed before config.json was written leaves behind is not "a run": start again over it
    if out.exists() and (not out.is_dir() or any(p.name not in LEFTOVERS and not p.name.endswith(".tmp")
                                                  for p in out.iterdir())):
        raise LmforgeError(f"{out} exists and is not an empty folder; choose another --out (nothing was written)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lmforge-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LmforgeError(f"cannot write the run folder {out}: {e.strerror or e}; choose another --out") from None
    return out


def _lmforge_config(path: Path) -> bool:
    """Whether `path` looks like a run's config.json (not whether it is intact: resuming checks that)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return True  # a damaged run's: --resume names the damage
    return isinstance(data, dict) and "format_version" in data


def remove_unstarted(out: Path, created: bool) -> None:
    """After a start that failed before config.json was written: remove what it left (the lock, a
    tokenizer), and the folder itself if the start created it and nothing else is in it."""
    out = Path(out)
    if not out.is_dir() or (out / CONFIG).exists() or training_process(out) is not None:
        return  # (a start refused because another process holds the folder leaves that process's files be)
    for name in LEFTOVERS:
        (out / name).unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def _not_yet(file: Path) -> None:
    """A run folder's file is missing because the run is still training (it writes its weights at its first
    evaluation): say so instead of calling the folder incomplete."""
    holder = training_process(file.parent)
    if holder is not None:
        raise LmforgeError(f"{file.parent} is still being trained (lmforge process {holder}), which has not written "
                           f"{file.name} yet; wait for its first evaluation, or for it to finish")


def not_in_training(run_dir: Path) -> None:
    """Refuse to resume a run that another process is training (its RunLock would refuse it later, after
    the probe and the data)."""
    holder = training_process(run_dir)
    if holder is not None:
        raise LmforgeError(f"{run_dir} is being trained by lmforge process {holder}; wait for it to finish (or stop "
                           f"it), then resume it")


def training_process(run_dir: Path) -> str | None:
    """The process id of the lmforge process training into `run_dir` (holding its run.lock), or None."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        with open(Path(run_dir) / LOCK, "r") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return file.read().strip() or "another"
            fcntl.flock(file, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


class RunLock:
    """An exclusive lock on a run folder (run.lock) while a process trains into it: a second process
    is refused in one line instead of interleaving its writes. The lock goes with the process."""

    def __init__(self, run_dir: Path, resume: bool = False):
        self.path, self.file, self.resume = Path(run_dir) / LOCK, None, resume

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return self
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another"
            self.file.close()
            instead = "then resume it" if self.resume else "or choose another --out"
            raise LmforgeError(f"{self.path.parent} is in use by lmforge process {holder}; wait for it to finish "
                               f"(or stop it), {instead}") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the lock
        return False


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written. Opened for a resumed run, it first
    drops the rows written after the resume point (the interrupted run's last steps are trained again)."""

    def __init__(self, path: Path, after_step: int = 0, write: bool = True):
        self.file = None
        if not write:
            return
        if path.exists():
            keep = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write
                if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= after_step:
                    keep.append(line + "\n")
            write_text(path, "".join(keep))
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise write_error(path, e) from None

    def write(self, row: dict) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:
                raise write_error(Path(self.file.name), e, "the rows before it are kept") from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def save_config(run_dir: Path, config: RunConfig, model_fields: dict, extra: dict | None = None) -> None:
    data = {"format_version": FORMAT_VERSION, **config.to_dict()}
    data["model"] = {"arch": config.model.arch, "options": model_fields}
    data.update(extra or {})
    write_json(run_dir / CONFIG, data)


def update_config(run_dir: Path, config: RunConfig, model_fields: dict) -> bool:
    """A resumed run's config.json, brought up to date with what it now runs (a longer budget, say),
    keeping what else the file holds; True when it changed."""
    path = run_dir / CONFIG
    stored = json.loads(path.read_text(encoding="utf-8"))
    data = {**stored, **config.to_dict(), "model": {"arch": config.model.arch, "options": model_fields}}
    if data == stored:
        return False
    replace_listed(run_dir, CONFIG, json.dumps(data, indent=2) + "\n")
    return True


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`: a fine-tune resumes with `lmforge finetune`."""
    try:
        finetune = bool(read_json(Path(run_dir) / CONFIG, "run config").get("finetune"))
    except LmforgeError:
        finetune = False
    return shell_join(["lmforge", "finetune" if finetune else "train", "--resume", run_dir])


def read_config(run_dir: Path) -> dict:
    """A run's config.json, checked: the format this lmforge reads, and every section well formed."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise LmforgeError(f"{run_dir} is a file; give a run folder (the one holding config.json)")
    if not run_dir.is_dir():
        raise LmforgeError(f"run folder {run_dir} does not exist; train one with "
                           f"`{shell_join(['lmforge', 'train', '--out', run_dir])}`")
    if not (run_dir / CONFIG).exists():
        raise LmforgeError(f"{run_dir} is not an lmforge run (no {CONFIG}); point at a folder made by `lmforge train`")
    data = read_json(run_dir / CONFIG, "run config")
    version = data.get("format_version")
    if version is None and "model_type" in data:
        raise LmforgeError(f"{run_dir} is a Hugging Face model folder, not an lmforge run; import it with "
                           f"`{shell_join(['lmforge', 'import', 'hf', run_dir])} --out RUN`, then use RUN")
    if version != FORMAT_VERSION:
        raise LmforgeError(f"{run_dir} was written by another lmforge (run format {version!r}; this lmforge reads "
                           f"{FORMAT_VERSION}); use the lmforge that made it, or train it again")
    model = data.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("arch"), str) and isinstance(model.get("options"), dict)):
        raise LmforgeError(f"{run_dir / CONFIG} is damaged: its model section needs an arch and options")
    if model["arch"] == "transformer":  # saved before the value residual existed: the block without it
        model["options"].setdefault("value_residual", False)
        # saved before attention had its own dropout: the shared rate was applied there too
        model["options"].setdefault("attention_dropout", model["options"].get("dropout", 0.05))
    if isinstance(data.get("train"), dict):  # saved before the embeddings had their own rate: the shared one
        data["train"].setdefault("embedding_lr_scale", 1.0)
    sections = {k: v for k, v in data.items() if k in ("data", "tokenizer", "train", "finetune")}
    try:
        RunConfig.from_dict({**sections, "model": model}, f"{run_dir / CONFIG}")
    except LmforgeError as e:
        raise LmforgeError(f"{e} (the file is damaged or from another lmforge)") from None
    return data


def build_from_config(data: dict) -> torch.nn.Module:
    return build_model(data["model"]["arch"], **data["model"]["options"])


def load_model(run_dir: Path, weights: Path | None = None) -> tuple[torch.nn.Module, object, dict]:
    """(model in eval mode on the CPU, tokenizer, config dict) from a run folder."""
    run_dir = Path(run_dir)
    check_manifest(run_dir)  # first: a damaged config.json is damage, not a run from another lmforge
    data = read_config(run_dir)
    model = build_from_config(data)
    path = weights or run_dir / WEIGHTS
    load_weights(model, load_tensors(path), path, "its config.json")
    return model.eval(), run_tokenizer(run_dir, data), data


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, described_by: str) -> None:
    """Load `state` (read from `path`) into `module`, failing in one line when a tensor is missing,
    extra, of another shape, not floating point, or not finite (what `described_by` made the module
    for does not fit those weights)."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LmforgeError(f"{path} does not match {described_by} (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); restore the file or re-run training")
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape:
            problem = f"{name} is {list(tensor.shape)}, the model needs {list(want.shape)}"
        elif want.is_floating_point() and not tensor.is_floating_point():
            problem = f"{name} holds {str(tensor.dtype).removeprefix('torch.')} values, not floating point"
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            problem = f"{name} holds NaN or infinite values"
        else:
            continue
        raise LmforgeError(f"{path} does not match {described_by} ({problem}); restore the file or re-run training")
    module.load_state_dict(state)


def run_tokenizer(run_dir: Path, data: dict):
    """A run folder's tokenizer, checked against its model's vocabulary (`data`: its config)."""
    if not (run_dir / "tokenizer.json").exists():
        raise LmforgeError(f"{run_dir} has no tokenizer.json; the run folder is incomplete")
    tokenizer = load_tokenizer(run_dir)
    if tokenizer.vocab_size != data["model"]["options"].get("vocab_size", tokenizer.vocab_size):
        raise LmforgeError(f"{run_dir / 'tokenizer.json'} does not belong to this model (vocabulary "
                           f"{tokenizer.vocab_size}, the model has {data['model']['options']['vocab_size']})")
    return tokenizer


# ---- resume points ------------------------------------------------------------------------------------

SEP = "|"  # between a parameter's name and a state key in an optimizer file ("blocks.0.attn.qkv.weight|exp_avg")


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain JSON."""
    tensors, scalars = {}, {}
    for param, entry in state_dict["state"].items():
        for key, value in entry.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{param}{SEP}{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(tensors: dict, plain: dict) -> dict:
    state: dict = {}
    for name, value in list(tensors.items()) + list(plain["scalars"].items()):
        param, key = name.rsplit(SEP, 1) if SEP in name else name.split(".", 1)  # "." in older files
        state.setdefault(int(param) if param.isdigit() else param, {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def resume_points(run_dir: Path) -> list[Path]:
    """A run's resume point folders, newest first (checkpoints/step-N, or a legacy last/)."""
    root = Path(run_dir) / CHECKPOINTS
    points = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True) \
        if root.is_dir() else []
    legacy = Path(run_dir) / LEGACY_RESUME
    return points + ([legacy] if legacy.is_dir() else [])


def save_resume(run_dir: Path, weights: dict, optimizer_states: list[dict], trainer_state: dict,
                keep: int = 2, average: dict | None = None) -> Path:
    """Write whole weights, optimizer states, trainer state and the weight average (if the run keeps
    one) as one resume point (a temporary folder renamed into place), then drop all but the newest
    `keep`. Refuses weights that are not finite: a diverged model never replaces a good resume point."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{trainer_state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if not all_finite(weights):
        raise LmforgeError(f"the weights at step {trainer_state['step']} are not finite (NaN or inf); they were not "
                           f"saved, and the last resume point is intact: lower train.lr and resume")
    previous = resume_points(run_dir)
    try:
        root.mkdir(exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_tensors(tmp / WEIGHTS, weights)
        plain = []
        for i, state_dict in enumerate(optimizer_states):
            tensors, rest = _flatten_optimizer(state_dict)
            save_tensors(tmp / f"optimizer{i}.safetensors", tensors)
            plain.append(rest)
        if average is not None:
            save_tensors(tmp / AVERAGE, average)
        write_json(tmp / "trainer_state.json", {**trainer_state, "optimizers": plain, "average": average is not None})
        write_manifest(tmp, ["trainer_state.json"])
        if final.exists():  # the same step saved again (an interrupted run's last point)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, LmforgeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the resume point {previous[0].name} is intact" if previous else "no earlier resume point exists"
        reason = exc if isinstance(exc, LmforgeError) else write_error(final, exc)
        raise LmforgeError(f"{reason} (while saving the resume point at step {trainer_state['step']}); {kept}; "
                           f"free some space, then continue with {resume_command(run_dir)}") from None
    for old in resume_points(run_dir)[max(1, keep):]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class ResumePoint(NamedTuple):
    weights: dict
    optimizers: list[dict]
    state: dict  # the trainer state
    average: dict | None  # the weight average, for runs that keep one


def load_resume(run_dir: Path, log=print) -> ResumePoint | None:
    """The newest readable resume point; a damaged point is reported and the one before it is read.
    None when the run has none (it was stopped before its first): it starts over. (Random draws are
    functions of the seed and the step, so no generator state is saved.)"""
    for point in resume_points(run_dir):
        try:
            check_manifest(point)
            state = read_json(point / "trainer_state.json", "trainer state")
            plain = state.pop("optimizers", None)
            averaged = state.pop("average", False)
            if not isinstance(plain, list) or not all(isinstance(p, dict) and {"scalars", "param_groups"} <= set(p)
                                                      for p in plain):
                raise LmforgeError(f"{point / 'trainer_state.json'} is damaged (its optimizer state)")
            weights = load_tensors(point / WEIGHTS)
            optimizers = [_unflatten_optimizer(load_tensors(point / f"optimizer{i}.safetensors"), p)
                          for i, p in enumerate(plain)]
            average = load_tensors(point / AVERAGE) if averaged else None
        except (LmforgeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            log(f"note: the resume point {point} cannot be used ({exc}); trying the one before it")
            continue
        return ResumePoint(weights, optimizers, state, average)
    if resume_points(run_dir):
        raise LmforgeError(f"no resume point of {run_dir} can be read; the run cannot continue: start a new one")
    return None
