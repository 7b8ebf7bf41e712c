"""Every config file loads; defaults files equal the dataclass defaults; errors name key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recsys.config import Config, ConfigError, from_dict, load_config, merge, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_file_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_defaults_files_restate_dataclass_defaults() -> None:
    defaults = to_dict(Config())
    for path in sorted((CONFIGS / "defaults").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        for section, values in data.items():
            assert values == defaults[section], f"{path} differs from recsys/config.py defaults"


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.epochz"):
        load_config(p)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"train.epochs.*integer"):
        load_config(p)


def test_set_overrides_and_types() -> None:
    cfg = load_config(None, ["train.epochs=3", "model.dim=32", "data.spark.master=local[1]", "eval.ks=[5,10]"])
    assert cfg.train.epochs == 3 and cfg.model.dim == 32
    assert cfg.data.spark.master == "local[1]" and cfg.eval.ks == (5, 10)
    with pytest.raises(ConfigError, match="--set train.lr_dense=abc"):
        load_config(None, ["train.lr_dense=abc"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["epochs"])


def test_extends_chain(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 4\nmodel:\n  dim: 16\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.epochs == 9 and cfg.model.dim == 16


def test_round_trip() -> None:
    cfg = load_config(None, ["train.task_weights={user_product: 1.0, user_seller: 0.0}"])
    assert merge(Config(), to_dict(cfg), "stored") == cfg


def test_mapping_settings_merge_key_by_key(tmp_path: Path) -> None:
    # one task weight changed: the other tasks keep theirs (a replaced mapping silently dropped them)
    cfg = load_config(None, ["train.task_weights.user_seller=0", "train.task_weights.product_seller=0.5"])
    assert cfg.train.task_weights == {"user_product": 1.0, "user_seller": 0.0, "product_seller": 0.5}
    (tmp_path / "x.yaml").write_text("data:\n  event_weights: {view: 0.2}\n  spark:\n    extra: {a.b: '1'}\n")
    cfg = load_config(tmp_path / "x.yaml", ["data.spark.extra={c.d: '2'}"])
    assert cfg.data.event_weights == {"view": 0.2, "cart": 0.3, "purchase": 1.0}
    assert cfg.data.spark.extra == {"a.b": "1", "c.d": "2"}


def test_stored_config_is_restored_exactly() -> None:
    # a stored mapping is the run's own (not merged into today's defaults)
    stored = to_dict(Config())
    stored["train"]["task_weights"] = {"user_product": 1.0}
    del stored["model"]["dim"]  # a key an older version did not store: its default
    cfg = from_dict(stored)
    assert cfg.train.task_weights == {"user_product": 1.0} and cfg.model.dim == Config().model.dim
    assert from_dict(to_dict(cfg)) == cfg
