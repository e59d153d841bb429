"""Training checkpoints: the trainable rows, their AdamW moments and the run's progress, written atomically
after each epoch so that an interrupted `personalize(resume=True)` continues to the same result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import McLlavaError
from .files import os_error_text

KILL_AT_ENV = "MCLLAVA_KILL_AT"


def fault_point(name: str) -> None:
    """Test hook: with MCLLAVA_KILL_AT=<name> the process SIGKILLs itself here (tests/test_reliability_kill.py).

    Names: ``step:<epoch>:<n>`` after the n-th optimizer step of an epoch; ``ckpt:<epoch>:written`` (new
    checkpoint complete beside the old one), ``ckpt:<epoch>:moved-aside`` (old one renamed away, new not yet in
    place), ``ckpt:<epoch>:swapped`` (new in place, old not yet deleted); ``bank:saved`` (before the checkpoint
    is removed).
    """
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(out: Path) -> Path:
    """Where a run writing the bank `out` keeps its checkpoint (beside it, removed once the bank is saved)."""
    return out.with_name(out.name + ".ckpt")


def save_checkpoint(path: Path, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Trainable tensors + AdamW moments (safetensors) and progress (JSON), swapped in atomically."""
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    steps = {}
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        if state:
            tensors[f"exp_avg.{i}"] = state["exp_avg"].cpu().contiguous()
            tensors[f"exp_avg_sq.{i}"] = state["exp_avg_sq"].cpu().contiguous()
            steps[i] = float(state["step"])
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**meta, "steps": steps}))
    except (OSError, SafetensorError) as exc:  # disk full, read-only folder: no partial checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise McLlavaError(
            f"could not write the training checkpoint {path}: {os_error_text(exc)}; the previous checkpoint is unchanged"
        ) from None
    point = f"ckpt:{meta.get('epoch')}"
    fault_point(f"{point}:written")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # left over when a run was killed before deleting it
    if path.exists():
        os.replace(path, old)
        fault_point(f"{point}:moved-aside")
    os.replace(tmp, path)
    fault_point(f"{point}:swapped")
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint: `path`, or `path.old` if a run was killed between `save_checkpoint`'s renames."""
    for folder in (path, path.with_name(path.name + ".old")):
        if (folder / "state.json").exists():
            return folder
    return None


def remove_checkpoint(path: Path) -> None:
    """Delete a run's checkpoint folders; `state.json` goes first so a half-deleted checkpoint is never resumed."""
    for folder in (path.with_name(path.name + ".old"), path.with_name(path.name + ".tmp"), path):
        (folder / "state.json").unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(path: Path, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Restore what `save_checkpoint` wrote into `params` and `optimizer`; returns the progress it recorded."""
    tensors = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    for i, p in enumerate(params):
        if f"exp_avg.{i}" in tensors:
            optimizer.state[p] = {
                "step": torch.tensor(meta["steps"][str(i)]),
                "exp_avg": tensors[f"exp_avg.{i}"].to(p.device),
                "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(p.device),
            }
    return meta
