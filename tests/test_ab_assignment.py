"""Salted-hash assignment: determinism, allocation, independence, behaviour when variants change."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import stats

from recsys.ab.assignment import Assigner, bucket
from recsys.config import ABConfig, ABVariant, ConfigError

IDS = [f"u{i:07d}" for i in range(100_000)]


def _ab(*weights: float, experiment: str = "exp1", salt: str = "s1") -> ABConfig:
    names = ["control", "treatment", "third", "fourth"]
    return ABConfig(experiment=experiment, salt=salt,
                    variants=tuple(ABVariant(name=n, weight=w) for n, w in zip(names, weights, strict=False)))


def test_bucket_is_the_documented_hash():
    h = hashlib.sha256(b"s1:exp1:u42").digest()
    assert bucket("u42", "exp1", "s1") == int.from_bytes(h[:8], "big") / 2.0**64
    assert 0.0 <= bucket("u42", "exp1", "s1") < 1.0


def test_deterministic_across_instances():
    a, b = Assigner.from_config(_ab(1, 1)), Assigner.from_config(_ab(1, 1))
    first = a.assign_many(IDS[:2000])
    assert list(first) == list(b.assign_many(IDS[:2000]))
    assert [a.assign(u) for u in IDS[:200]] == list(first[:200])


def test_proportions_follow_normalised_weights():
    a = Assigner.from_config(_ab(1, 2, 1))  # weights are normalised: 0.25, 0.5, 0.25
    assert a.allocation == {"control": 0.25, "treatment": 0.5, "third": 0.25}
    got = a.assign_many(IDS)
    for name, p in a.allocation.items():
        share = float(np.mean(got == name))
        assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / len(IDS)), (name, share)


def test_independent_across_experiments_and_salts():
    x = Assigner.from_config(_ab(1, 1, experiment="exp1")).assign_many(IDS)
    for other in (_ab(1, 1, experiment="exp2"), _ab(1, 1, salt="s2")):
        y = Assigner.from_config(other).assign_many(IDS)
        table = np.array([[np.sum((x == a) & (y == b)) for b in ("control", "treatment")]
                          for a in ("control", "treatment")])
        assert stats.chi2_contingency(table)[1] > 0.001
        assert abs(np.mean(x == y) - 0.5) < 0.01


def test_appending_a_variant_moves_users_as_documented():
    """(0.5, 0.5) -> thirds: [0, 1/3) stays control and [1/2, 2/3) stays treatment: half the users stay."""
    old = Assigner.from_config(_ab(1, 1)).assign_many(IDS)
    new = Assigner.from_config(_ab(1, 1, 1)).assign_many(IDS)
    stay = float(np.mean(old == new))
    assert abs(stay - 0.5) < 0.01
    # intervals: control [0, 1/2) -> [0, 1/3), treatment [1/2, 1) -> [1/3, 2/3), third [2/3, 1)
    assert not np.any((old == "treatment") & (new == "control"))
    assert not np.any((old == "control") & (new == "third"))
    assert abs(np.mean((old == "control") & (new == "treatment")) - 1 / 6) < 0.01
    assert abs(np.mean((old == "treatment") & (new == "third")) - 1 / 3) < 0.01
    # same weights, only a bundle changed: nobody moves
    edited = ABConfig(experiment="exp1", salt="s1", variants=(ABVariant("control", 1, "b1"), ABVariant("treatment", 1, "b2")))
    assert list(Assigner.from_config(edited).assign_many(IDS[:5000])) == list(old[:5000])


@pytest.mark.parametrize("variants, match", [
    ((ABVariant("a", 1), ABVariant("a", 1)), "duplicate"),
    ((ABVariant("a", 1), ABVariant("b", 0)), "must be > 0"),
    ((ABVariant("a", 1), ABVariant("b", -1)), "must be > 0"),
    ((ABVariant("", 1),), "empty variant name"),
    ((), "at least one variant"),
])
def test_invalid_variants(variants, match):
    with pytest.raises(ConfigError, match=match):
        Assigner("exp", "salt", variants)


def test_empty_experiment_name():
    with pytest.raises(ConfigError, match="experiment"):
        Assigner("", "salt", (ABVariant("a", 1),))
