"""Saving and loading trained towers without pickles: a state dict plus a JSON description."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from towers.shapes import TowerShape
from towers.two_tower import TwoTowerModel

WEIGHTS = "towers.pt"
DESCRIPTION = "model.json"
_ADDED_BUFFERS = ("log_popularity", "popularity_prior")


def save_towers(model: TwoTowerModel, directory: str | Path, extra: dict[str, Any]) -> None:
    """Write ``towers.pt`` (tensors only) and ``model.json`` (shape, config, fingerprints)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS)
    desc = {"shape": model.shape.to_dict(), **extra}
    (directory / DESCRIPTION).write_text(json.dumps(desc, indent=2, sort_keys=True, default=str))


def load_towers(directory: str | Path, device: str = "cpu") -> tuple[TwoTowerModel, dict[str, Any]]:
    """Rebuild the towers from a model directory; never unpickles (``weights_only=True``).

    Returns:
        (model in eval mode, description dict).
    """
    directory = Path(directory)
    desc = json.loads((directory / DESCRIPTION).read_text())
    shape = TowerShape(**desc["shape"])
    model = TwoTowerModel(shape)
    state = torch.load(directory / WEIGHTS, map_location=device, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Models saved before the popularity prior existed score by the cosine alone: their zero
    # defaults are right, anything else missing or extra is a mismatch.
    missing = [k for k in missing if k not in _ADDED_BUFFERS]
    if missing or unexpected:
        raise RuntimeError(f"{directory / WEIGHTS}: state dict does not match the towers (missing {missing}, unexpected {unexpected})")
    model.to(device).eval()
    return model, desc


def serving_model_dir(run_dir: str | Path) -> Path:
    """The model that serving uses: the full-data refit when there is one, else the selected model."""
    run_dir = Path(run_dir)
    full = run_dir / "model_full"
    return full if (full / DESCRIPTION).exists() else run_dir / "model"
