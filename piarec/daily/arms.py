"""The arms of a daily scoring run: the control model and an optional challenger, users
split between them by a salted hash of user_id (stable from day to day for a fixed salt).
Each arm's model travels to executors as the bytes of its bundle files."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from piarec.config import PipelineConfig
from piarec.errors import ConfigError
from piarec.models.bundle import (BUNDLE_FILES, ModelBundle, files_digest, load_bundle, local_version,
                                  read_bundle_files)
from piarec.registry.client import ModelRef, load_model
from piarec.scoring.arrow import in_share

ASSIGNMENT = 'arm = challenger when fmix64(fnv1a64(salt + "\\0" + user_id)) < share * 2^64'
_ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Arm:
    """One arm of a run: its name, its model and the bytes executors load it from."""

    name: str
    bundle: ModelBundle = field(repr=False)
    ref: ModelRef
    files: dict[str, bytes] = field(repr=False)  # the bundle's files; weights load weights-only
    digest: str  # sha256 over the files

    @property
    def version(self) -> str:
        """What the rows' ``model_version`` says: the registry version, else a digest."""
        return self.ref.version or local_version(self.digest)

    def model_info(self) -> dict[str, Any]:
        return {**self.ref.info(), "version": self.version, "digest": self.digest, "n_items": self.bundle.n_items}


@dataclass(frozen=True)
class ArmPlan:
    """The arms of a run (``arms[0]`` is the control) and how users are split."""

    arms: list[Arm]
    salt: str
    challenger_share: float  # share of users in arms[1]; 0 with a single arm

    def assign(self, user_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int8 [B]: the index in :attr:`arms` of each user's arm."""
        if len(self.arms) == 1:
            return np.zeros(len(user_ids), np.int8)
        return in_share(user_ids, self.salt, self.challenger_share).astype(np.int8)

    def shares(self) -> dict[str, float]:
        if len(self.arms) == 1:
            return {self.arms[0].name: 1.0}
        return {self.arms[0].name: 1.0 - self.challenger_share, self.arms[1].name: self.challenger_share}

    def assignment_info(self) -> dict[str, Any]:
        return {"method": ASSIGNMENT, "salt": self.salt, "shares": self.shares()}


def bundle_files(ref: ModelRef) -> tuple[dict[str, bytes], str]:
    """The bytes of a resolved model's bundle files and their sha256 digest."""
    files = read_bundle_files(ref.local_dir)
    return files, files_digest(files)


def bundle_from_files(files: dict[str, bytes], info: dict[str, Any] | None = None) -> ModelBundle:
    """Load a bundle from its files' bytes through :func:`piarec.models.bundle.load_bundle` (the one
    loader: validation and a weights-only load), via a private temporary folder."""
    with tempfile.TemporaryDirectory(prefix="piarec-bundle-") as tmp:
        for name in BUNDLE_FILES:
            Path(tmp, name).write_bytes(files[name])
        return load_bundle(tmp, info)


def plan_arms(
    cfg: PipelineConfig,
    model_uri: str,
    arm: str,
    challenger_uri: str | None = None,
    challenger_share: float | None = None,
) -> ArmPlan:
    """Resolve and load the control model (and the challenger, when given)."""
    share = cfg.scoring.challenger_share if challenger_share is None else challenger_share
    names = [arm] + ([cfg.scoring.challenger_arm] if challenger_uri else [])
    for name in names:
        if not _ARM_NAME.match(name):
            raise ConfigError(f"arm {name!r} must be letters, digits, '_' or '-' (it names a folder)")
    if len(set(names)) != len(names):
        raise ConfigError(f"the control arm and scoring.challenger_arm are both {arm!r}; name them apart")
    if challenger_uri and not 0.0 < share <= 1.0:
        raise ConfigError(f"the challenger share must be in (0, 1], got {share}")
    arms = []
    for name, uri in zip(names, [model_uri, challenger_uri]):
        bundle, ref = load_model(cfg, uri)
        files, digest = bundle_files(ref)
        arms.append(Arm(name, bundle, ref, files, digest))
    return ArmPlan(arms, cfg.scoring.ab_salt, share if challenger_uri else 0.0)
