"""Deterministic assignment of users to experiment variants by a salted hash.

A user's *bucket* is ``sha256(f"{salt}:{experiment}:{user_id}")`` read as a big-endian 64-bit integer
of its first 8 bytes, divided by 2**64: a uniform number in [0, 1) that depends only on the salt,
the experiment name and the user id. Variants own consecutive intervals of [0, 1) in the configured
order, with widths equal to their normalised weights (``ABVariant.weight / sum of weights``); a user
gets the variant whose interval holds its bucket. Consequences:

* The same (salt, experiment, user) always gets the same variant, on every process and machine.
* Different experiment names (or salts) give independent assignments.
* Changing the weights or the list of variants moves users. Appending a variant re-normalises the
  weights, so the existing intervals shrink and some users move: e.g. (control 0.5, treatment 0.5)
  -> (control, treatment, new) at 1/3 each keeps exactly half of the users in their old variant
  (``[0, 1/3)`` stays control, ``[1/2, 2/3)`` stays treatment). Users exposed before and after such a
  change are in two variants; :func:`recsys.ab.analysis.analyze` excludes them and reports the count.
  Start a new experiment (new name) when the variants change; only the variant names and ``bundle``
  may be edited in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from recsys.config import ABConfig, ABVariant, ConfigError


def bucket(user_id: str, experiment: str, salt: str) -> float:
    """The user's uniform number in [0, 1) for this experiment and salt."""
    h = hashlib.sha256(f"{salt}:{experiment}:{user_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def validate_variants(variants: Sequence[ABVariant], where: str = "ab.variants") -> None:
    """Raise ``ConfigError`` unless the variants have unique non-empty names and positive finite weights."""
    if not variants:
        raise ConfigError(f"{where}: an experiment needs at least one variant")
    seen: set[str] = set()
    for i, v in enumerate(variants):
        if not v.name or not str(v.name).strip():
            raise ConfigError(f"{where}[{i}].name: empty variant name")
        if v.name in seen:
            raise ConfigError(f"{where}[{i}].name: duplicate variant name {v.name!r}")
        seen.add(v.name)
        w = float(v.weight)
        if not np.isfinite(w) or w <= 0:
            raise ConfigError(f"{where}[{i}].weight: must be > 0, got {v.weight!r} (variant {v.name!r})")


@dataclass(frozen=True)
class Assigner:
    """Assignment for one experiment.

    Example::

        a = Assigner.from_config(cfg.ab)       # or Assigner("exp1", "salt", (ABVariant("control", 1), ...))
        a.assign("u000123")                    # -> "control"
        a.assign_many(["u1", "u2"])            # -> np.array(["control", "treatment"])
        a.allocation                           # {"control": 0.5, "treatment": 0.5}
    """

    experiment: str
    salt: str
    variants: tuple[ABVariant, ...]

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ConfigError("ab.experiment: empty experiment name")
        validate_variants(self.variants)
        w = np.array([float(v.weight) for v in self.variants])
        edges = np.cumsum(w / w.sum())
        edges[-1] = 1.0
        object.__setattr__(self, "_edges", edges)  # upper bounds of the variants' intervals

    @classmethod
    def from_config(cls, ab: ABConfig) -> Assigner:
        return cls(ab.experiment, ab.salt, tuple(ab.variants))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants)

    @property
    def allocation(self) -> dict[str, float]:
        """Normalised weights per variant name (sum 1)."""
        w = np.array([float(v.weight) for v in self.variants])
        return {v.name: float(x) for v, x in zip(self.variants, w / w.sum(), strict=True)}

    def bucket(self, user_id: str) -> float:
        return bucket(str(user_id), self.experiment, self.salt)

    def index(self, user_id: str) -> int:
        """Index of the user's variant in ``variants``."""
        return int(min(np.searchsorted(self._edges, self.bucket(user_id), side="right"), len(self.variants) - 1))

    def assign(self, user_id: str) -> str:
        """The user's variant name."""
        return self.variants[self.index(user_id)].name

    def variant(self, user_id: str) -> ABVariant:
        return self.variants[self.index(user_id)]

    def assign_many(self, user_ids: Iterable[str]) -> np.ndarray:
        """Variant names for many users (object array)."""
        b = np.fromiter((bucket(str(u), self.experiment, self.salt) for u in user_ids), dtype=np.float64)
        idx = np.minimum(np.searchsorted(self._edges, b, side="right"), len(self.variants) - 1)
        return np.array(self.names, dtype=object)[idx]
