"""The model bundle: everything a registered model version carries, with no pickles.

A bundle directory holds:

- ``config.json``   format version, number of items, the ModelConfig (its ``backbone`` and
                    ``encoder`` say which model class the weights belong to) -- or, for a
                    baseline (:mod:`piarec.models.baselines`), ``baseline``: its kind and parameters
- ``weights.pt``    the state_dict, loaded with ``torch.load(weights_only=True)``
- ``items.parquet`` item_idx int32, item_id string, popularity float32 (training users
                    per item; the popularity fallback for users with no known titles)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from piarec.config import ModelConfig
from piarec.errors import ModelNotFoundError
from piarec.models.factory import build_model

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE = "config.json", "weights.pt", "items.parquet"
BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE)


@dataclass
class ModelBundle:
    model: torch.nn.Module  # MultiVAE, RecVAE or a baseline ranker (encode / logits), in eval mode, on CPU
    item_ids: np.ndarray  # str [I]; position = the model's item index
    popularity: np.ndarray  # float32 [I]
    info: dict[str, Any] = field(default_factory=dict)  # name / version / run_id when known

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self) -> dict[str, int]:
        """item_id -> the model's item index."""
        return {item: i for i, item in enumerate(self.item_ids.tolist())}


def save_bundle(
    directory: str | Path,
    model: torch.nn.Module,
    item_ids: np.ndarray,
    popularity: np.ndarray,
) -> Path:
    """Write a bundle into ``directory`` (created). Returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if len(item_ids) != model.n_items or len(popularity) != model.n_items:
        raise ValueError(
            f"bundle needs {model.n_items} item ids and popularity values, "
            f"got {len(item_ids)} and {len(popularity)}"
        )
    config: dict[str, Any] = {"format_version": FORMAT_VERSION, "n_items": model.n_items}
    if hasattr(model, "bundle_config"):
        config["baseline"] = model.bundle_config()
    else:
        config["model"] = model.config.model_dump()
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / WEIGHTS_FILE)
    table = pa.table(
        {
            "item_idx": pa.array(np.arange(len(item_ids), dtype=np.int32)),
            "item_id": pa.array([str(x) for x in item_ids], pa.string()),
            "popularity": pa.array(np.asarray(popularity, dtype=np.float32)),
        }
    )
    pq.write_table(table, out / ITEMS_FILE)
    return out


def model_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """An untrained model of the class and shape a bundle's ``config.json`` describes."""
    if "baseline" in config:
        from piarec.models.baselines import ranker_from_config

        try:
            return ranker_from_config(int(config["n_items"]), config["baseline"])
        except ValueError as exc:
            raise ModelNotFoundError(f"model bundle: {exc}") from None
    return build_model(int(config["n_items"]), ModelConfig.model_validate(config["model"]))


def load_bundle(directory: str | Path, info: dict[str, Any] | None = None) -> ModelBundle:
    """Load a bundle written by :func:`save_bundle`; weights never go through pickle."""
    src = Path(directory)
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE) if not (src / n).is_file()]
    if missing:
        raise ModelNotFoundError(f"model directory {str(src)!r} lacks {', '.join(missing)}")
    config = json.loads((src / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelNotFoundError(
            f"model format {config.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    model = model_from_config(config)
    # weights_only=True refuses anything but tensors and plain containers.
    state = torch.load(src / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    items = pq.read_table(src / ITEMS_FILE).sort_by("item_idx")
    item_ids = np.asarray(items.column("item_id").to_pylist(), dtype=object)
    if len(item_ids) != model.n_items:
        raise ModelNotFoundError(
            f"model vocabulary has {len(item_ids)} items but the weights expect {model.n_items}"
        )
    popularity = items.column("popularity").to_numpy().astype(np.float32)
    return ModelBundle(model, item_ids, popularity, dict(info or {}))


def read_bundle_files(directory: str | Path) -> dict[str, bytes]:
    """The bytes of a bundle's files (:data:`BUNDLE_FILES`), by file name."""
    return {name: Path(directory, name).read_bytes() for name in BUNDLE_FILES}


def files_digest(files: Mapping[str, bytes]) -> str:
    """sha256 (hex) over a bundle's files: each name, then the sha256 of its bytes, in
    :data:`BUNDLE_FILES` order. The same files give the same digest wherever they lie."""
    h = hashlib.sha256()
    for name in BUNDLE_FILES:
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def local_version(digest: str) -> str:
    """The ``model_version`` label of a model that is not a registered version:
    ``local-<first 12 hex of its files' digest>`` (the daily job and the pyfunc model alike)."""
    return f"local-{digest[:12]}"
