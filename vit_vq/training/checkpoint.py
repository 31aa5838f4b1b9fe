"""Atomic training checkpoints under `<output>/checkpoints/checkpoint-<step>/`.

A checkpoint is accelerate's `save_state` folder plus a few files of ours:

| file | content | format |
|---|---|---|
| `model.safetensors`, `model_1.safetensors` | tokenizer (incl. EMA codebook buffers), discriminator | safetensors |
| `optimizer*.bin`, `scheduler*.bin`, `random_states_<rank>.pkl`, `scaler.pt` | accelerate's state | pickle (1) |
| `quantizer_pool_<rank>.safetensors` | the quantizer's restart pool (not in its `state_dict`) | safetensors |
| `model_ema.safetensors` | EMA of the weights, when enabled | safetensors |
| `trainer_state.json` | step, epoch, data position, counters | JSON |

(1) accelerate reads these with `torch.load(weights_only=True)`.

Everything is written into `.tmp-checkpoint-<step>` and renamed into place once complete;
`trainer_state.json` is written last, and only folders that hold it count as checkpoints.
A crash while saving therefore leaves the previous checkpoint as the latest one.
Trainer state is read only from inside the run's own output folder (`resolve_resume`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
EMA_NAME = "model_ema.safetensors"


@dataclass
class TrainerState:
    """Counters restored on resume. `batch_in_epoch` counts micro-batches each rank consumed this epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    skipped_keys: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> TrainerState:
        data = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> None:
        with open(path, "w") as fh:
            json.dump(asdict(self), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())


def checkpoints_dir(output: str | Path) -> Path:
    return Path(output).expanduser().absolute() / "checkpoints"


WEIGHTS_NAME = "model.safetensors"  # what accelerate's save_state writes for the model (safe_serialization)


def missing_files(folder: Path) -> list[str]:
    """What a checkpoint folder lacks to be resumed from: the trainer state, or the model weights."""
    return [name for name in (STATE_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints `(step, folder)`, oldest first.

    A folder without its trainer state or its weights (copied in part, or damaged) is not one:
    `--resume latest` then falls back to the newest complete checkpoint before it.
    """
    root = checkpoints_dir(output)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name.removeprefix(PREFIX)
        if p.name.startswith(PREFIX) and suffix.isascii() and suffix.isdigit() and (p / STATE_NAME).is_file():
            if missing := missing_files(p):
                logger.warning("skipping %s: it has no %s", p, " or ".join(missing))
                continue
            found.append((int(suffix), p))
    return sorted(found)


def resolve_resume(output: str | Path, resume: str) -> Path | None:
    """The checkpoint folder for `--resume`: `'latest'` (None when there is none yet) or a folder.

    Raises:
        FileNotFoundError: a named folder that is not a complete checkpoint.
        ValueError: a folder that resolves outside `<output>/checkpoints` (named, or the latest
            one being a symlink): trainer state contains pickled optimizer and RNG files and is
            read only from the run's own output folder.
    """
    if resume == "latest":
        found = list_checkpoints(output)
        if not found:
            return None
        path = found[-1][1]  # may be a symlink: checked below like a named folder
    else:
        path = Path(resume).expanduser()
        if not path.exists() and (checkpoints_dir(output) / resume).exists():
            path = checkpoints_dir(output) / resume  # a bare folder name such as checkpoint-200
    root = checkpoints_dir(output).resolve()
    if not path.resolve().is_relative_to(root):
        link = f" (a link to {str(path.resolve())!r})" if path.is_symlink() else ""
        raise ValueError(
            f"refusing to resume from {str(path)!r}{link}: trainer state (pickled optimizer and RNG files) is read only "
            f"from this run's own folder {str(root)!r}; copy a checkpoint you trust there, or use TrainConfig.init "
            "to fine-tune from exported weights"
        )
    if missing := missing_files(path):
        raise FileNotFoundError(f"{str(path)!r} is not a complete checkpoint (no {' or '.join(missing)})")
    return path


def save_checkpoint(
    accelerator: Any,
    output: str | Path,
    state: TrainerState,
    *,
    rank_tensors: dict[str, dict[str, torch.Tensor]],
    main_tensors: dict[str, dict[str, torch.Tensor]],
    keep: int,
) -> Path:
    """Write a checkpoint atomically on every rank; returns its folder. Collective: call on all ranks.

    Args:
        rank_tensors: `{stem: tensors}` written by every rank as `<stem>_<rank>.safetensors`.
        main_tensors: `{file name: tensors}` written by the main process only.
        keep: the newest `keep` checkpoints are kept, older ones removed.
    """
    from safetensors.torch import save_file

    root = checkpoints_dir(output)
    final = root / f"{PREFIX}{state.step}"
    tmp = root / f".tmp-{PREFIX}{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    rank = accelerator.process_index
    for stem, tensors in rank_tensors.items():
        save_file(_cpu(tensors), tmp / f"{stem}_{rank}.safetensors")
    if accelerator.is_main_process:
        for name, tensors in main_tensors.items():
            save_file(_cpu(tensors), tmp / name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        state.write(tmp / STATE_NAME)  # last: marks the folder complete
        old = root / f".old-{PREFIX}{state.step}"
        if final.exists():  # the same step saved twice (e.g. a resumed run that ends at once)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for _, old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, folder: Path) -> tuple[TrainerState, dict[str, dict[str, torch.Tensor]]]:
    """Restore accelerate's state from `folder`; return our counters and our tensor files.

    The returned dict maps `quantizer_pool` (this rank's file, or rank 0's when the world size
    changed) and `model_ema` to their tensors, when present.
    """
    from safetensors.torch import load_file

    accelerator.load_state(str(folder), load_kwargs={"weights_only": True}, strict=True)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    pool = folder / f"quantizer_pool_{accelerator.process_index}.safetensors"
    pool = pool if pool.is_file() else folder / "quantizer_pool_0.safetensors"
    if pool.is_file():
        tensors["quantizer_pool"] = load_file(pool)
    if (folder / EMA_NAME).is_file():
        tensors["model_ema"] = load_file(folder / EMA_NAME)
    return TrainerState.read(folder / STATE_NAME), tensors


def remove_stale_temporaries(output: str | Path) -> None:
    """Remove `.tmp-`/`.old-checkpoint-*` folders left by a crash while saving (main process only)."""
    root = checkpoints_dir(output)
    if root.is_dir():
        for p in root.glob(f".old-{PREFIX}*"):
            final = root / p.name.removeprefix(".old-")
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:  # the crash came between the two renames: the old copy is the checkpoint
                os.replace(p, final)
        for p in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


__all__ = [
    "TrainerState",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "checkpoints_dir",
    "remove_stale_temporaries",
    "STATE_NAME",
]
