"""Typed, frozen configuration for every stage, loaded from YAML only at entry points.

Sections mirror the packages: ``data``, ``model``, ``train``, ``eval``, ``retrieval``, ``ranking``,
``serve``, ``ab``. The dataclass defaults are the documented defaults (``configs/defaults/*.yaml``
restate them and a test keeps both equal); experiment files under ``configs/`` hold only their
differences. ``--set section.key=value`` overrides are applied last. Unknown keys and wrong types are
errors that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the source."""


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    # Vocabularies with at most this many ids are broadcast to the id lookups (no shuffle of the
    # events); larger ones (a cluster's 100M users) are joined with a shuffle.
    broadcast_vocab_rows: int = 2_000_000
    app_name: str = "recsys"
    log_level: str = "WARN"
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    source: str = "contract"  # contract | synthetic | olist | lightgcn | movielens
    path: str = ""
    synthetic_preset: str = "small"
    synthetic_seed: int = 7
    event_weights: dict[str, float] = field(
        default_factory=lambda: {"view": 0.05, "cart": 0.3, "purchase": 1.0}
    )
    # Event types that become training positives (views are usually too noisy to be targets).
    positive_events: tuple[str, ...] = ("purchase", "cart", "view")
    # Event types that define "already bought" for exclusion at recommendation time.
    bought_events: tuple[str, ...] = ("purchase",)
    split: str = "auto"  # auto | temporal | leave_last_out | predefined | random
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # Which of a user's train positives the random and predefined splits carve to val (and, for
    # random, to test): "random" (seeded), or "last" (the latest by timestamp; without timestamps
    # only what the source orders: the LightGCN adapter gives the end of each train line).
    val_carve: str = "random"
    # What the event timestamps are: "time" (a clock: temporal splits, hour/day-of-week context,
    # popularity windows, ages) or "order" (only the order of each user's events: histories,
    # leave-last-out and val_carve=last use it, nothing reads it as time). The LightGCN adapter
    # gives each line's position as an order timestamp when this is "order".
    timestamps: str = "time"
    min_user_count: int = 1
    min_product_count: int = 1
    min_seller_count: int = 1
    max_history: int = 50
    popularity_windows_days: tuple[int, ...] = (7, 30)
    price_bands: int = 10
    rows_per_row_group: int = 65536
    seed: int = 17
    spark: SparkConfig = field(default_factory=SparkConfig)


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    history_pooling: str = "mean"  # mean | recency | short_long | attention
    use_user_id: bool = True
    # The history encoder reads its own product / seller tables instead of the candidate towers' id
    # tables (asymmetric item-item, as in FISM): the score is <W mean(q_history), p_candidate>.
    separate_history: bool = False
    # Co-occurrence neighbours per product whose mean id embedding is added to the product's own
    # (towers/item_neighbors.py); 0 = off.
    item_neighbors: int = 0
    # A learned bias per product added to its logit (score = cos(u, p) / temperature + b_p): unit
    # vectors cannot say how broadly a product is chosen, a bias can. Retrieval folds it into the
    # product offsets (towers.two_tower.TwoTowerModel.product_offsets), so the index ranks by it too.
    item_bias: bool = False
    user_hash_buckets: int = 0  # 0 = unknown users share index 0; >0 hashes unseen ids into buckets
    temperature: float = 0.1
    learn_temperature: bool = False
    dropout: float = 0.1
    history_dropout: float = 0.2
    # Training only: hide the latest floor(u * history_horizon * n) of a history's n items (u uniform
    # in [0, 1], at least one item kept), so the target lies up to that many steps ahead of what the
    # user tower sees. 0 = next-item examples. For data whose held-out items lie further ahead than
    # the next step (towers/history_horizon.py).
    history_horizon: float = 0.0
    sparse_embeddings: bool = True
    use_features: bool = True
    hidden: int = 128


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 1024
    lr_sparse: float = 0.01
    lr_dense: float = 0.001
    weight_decay: float = 1e-5
    # L2 penalty on the id-embedding rows each batch touches (0 = off); see TwoTowerLightning.embedding_penalty.
    embedding_l2: float = 0.0
    user_id_dropout: float = 0.1
    num_negatives: int = 2048
    logq_correction: bool = True
    # Weight of positives whose product is already in the example's history (re-views, the cart and
    # purchase after a view). They teach "score what I just saw", a shortcut that does not find the
    # next new item: on the synthetic marketplace 0.0 lifted test Recall@20 from 0.149 to 0.191.
    repeat_weight: float = 0.0
    remove_accidental_hits: bool = True
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"user_product": 1.0, "user_seller": 0.3, "product_seller": 0.3}
    )
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: int = 1
    precision: str = "32-true"  # use bf16-mixed on GPU
    strategy: str = "auto"
    seed: int = 42
    early_stopping_patience: int = 3  # validations without improvement after the last lr decay
    # On a validation plateau: restore the best weights and multiply the learning rates by
    # lr_decay_factor, up to max_lr_decays times (towers/lr_schedule.py); refit replays it.
    lr_decay_factor: float = 0.1
    lr_decay_patience: int = 2
    max_lr_decays: int = 2
    val_every_n_epochs: int = 1
    val_k: int = 20
    val_max_users: int = 20000
    num_workers: int = 0
    num_threads: int = 0  # torch intra-op threads per training process; 0 = the cores divided among the processes
    # Keep freed memory mapped instead of returning it to the kernel after every step (glibc only;
    # towers/allocator.py): the page faults that avoids were half of a CPU step on 1M-row tables.
    retain_freed_memory: bool = True
    # Back the large id tables and their Adam moments by 2 MiB pages on the CPU (Linux transparent
    # huge pages; towers/allocator.py): random row access on 1M-row tables is TLB-miss bound.
    huge_pages: bool = True
    loader: str = "arrow"  # arrow | petastorm
    max_minutes: float = 0.0  # 0 = no wall-clock limit
    tracking_uri: str = ""  # "" = sqlite file under the run dir, or $MLFLOW_TRACKING_URI
    experiment: str = "recsys"
    register_model: bool = True
    checkpoint_every_n_steps: int = 0  # optimizer steps (batches); 0 = checkpoints at epoch ends only
    # Batches each Lightning training step trains on, one optimizer step each, in order (the same
    # weights for any value): spreads Lightning's ~1 ms per-step cost (towers/batch_groups.py).
    batches_per_call: int = 4
    # After model selection, retrain on all the data the user gave for the selected epoch count:
    # that model is exported and served (the evaluated one stays under RUN_DIR/model).
    refit_full: bool = True
    # Weights of log product popularity added to the score at scoring time; the one with the best
    # validation Recall@val_k is kept (towers/popularity_prior.py); (0.0,) = cosine only.
    popularity_prior_grid: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


@dataclass(frozen=True)
class EvalConfig:
    # Event types whose held-out interactions are the targets (absent types are ignored).
    target_events: tuple[str, ...] = ("purchase",)
    ks: tuple[int, ...] = (10, 20, 50, 100)
    ndcg_ks: tuple[int, ...] = (10, 20)
    exclude_train: bool = True
    batch_users: int = 1024
    device: str = "cpu"  # where `recsys evaluate` scores the catalog: cpu | cuda | auto (cuda when available)
    baselines: tuple[str, ...] = ("popularity", "als")
    als_rank: int = 64
    als_iterations: int = 10
    als_reg: float = 0.05
    als_alpha: float = 20.0
    heavy_user_quantile: float = 0.8


def trainer_precision(train: TrainConfig) -> str:
    """Lightning's ``precision`` for ``train``: bf16 mixed precision on a GPU unless another was chosen."""
    return "bf16-mixed" if train.accelerator == "gpu" and train.precision == "32-true" else train.precision


# The eval settings that towers training reads (validation targets, the cut-offs it logs): the others
# (baselines, ALS, slices, the evaluation device) change the evaluation only, not the trained model.
TRAINING_EVAL_KEYS = ("target_events", "ks")


@dataclass(frozen=True)
class RetrievalConfig:
    index_factory: str = ""  # "" = choose by catalog size
    recall_floor: float = 0.95
    recall_k: int = 100
    recall_sample_queries: int = 1000
    hnsw_ef_search: int = 128
    ivf_nprobe: int = 32
    offer_policy: str = "lowest_price"  # lowest_price | best_rating | fastest_shipping | best_value
    max_per_seller: int = 0  # 0 = no cap
    overfetch: int = 4
    export_batch_size: int = 8192


@dataclass(frozen=True)
class RankingConfig:
    enabled: bool = True
    candidates: int = 100
    loss: str = "listwise"  # listwise | pointwise
    label_weights: dict[str, float] = field(
        default_factory=lambda: {"purchase": 1.0, "cart": 0.5, "view": 0.2}
    )
    cross_layers: int = 3
    hidden: tuple[int, ...] = (256, 128)
    epochs: int = 8
    batch_size: int = 256
    lr: float = 0.001
    max_train_users: int = 50000
    # Learn a correction to the towers' logit (retrieval score / model.temperature) instead of a
    # score from scratch: an untrained ranker keeps retrieval order (ranking.model.RankerShape).
    # Off by default: on the small preset it did not beat the plain ranker (README "Results").
    residual: bool = False
    bootstrap_samples: int = 1000
    seed: int = 5


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    ranking_port: int = 8001
    max_k: int = 1000
    max_batch_users: int = 256
    max_history: int = 200
    request_timeout_s: float = 2.0
    ranker_timeout_s: float = 0.05
    retries: int = 2
    exposure_log: str = ""  # "" = no exposure log
    exposure_rotate_mb: float = 64.0


@dataclass(frozen=True)
class ABVariant:
    name: str = "control"
    weight: float = 0.5
    bundle: str = ""  # retrieval bundle (or run dir) of this variant; "" = the served one
    ranker: str = ""  # ranker run dir (or its ranker/ dir) of this variant; "" = the served one


@dataclass(frozen=True)
class ABConfig:
    experiment: str = ""
    salt: str = "recsys"
    variants: tuple[ABVariant, ...] = ()


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ab: ABConfig = field(default_factory=ABConfig)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain mappings, with type checks
# ----------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, non_none[0], key, source)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        kt, vt = args
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, mapping: dict[str, Any], prefix: str, source: str, base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{key}' (valid: {', '.join(sorted(names))})")
        tp = hints[k]
        if is_dataclass(tp) and base is not None and isinstance(v, dict):
            kwargs[k] = _build(tp, v, key, source, getattr(base, k))
        elif typing.get_origin(tp) is dict and base is not None and isinstance(v, dict):
            # mapping settings merge key by key: ``--set train.task_weights.user_seller=0`` changes
            # that weight and keeps the others (replacing the mapping dropped them silently)
            kwargs[k] = {**getattr(base, k), **_coerce(v, tp, key, source)}
        else:
            kwargs[k] = _coerce(v, tp, key, source)
    if base is not None:
        return replace(base, **kwargs)
    return cls(**kwargs)


def merge(cfg: Config, mapping: dict[str, Any], source: str) -> Config:
    """Return ``cfg`` with the values of ``mapping`` (a nested section dict) applied.

    Args:
        cfg: the configuration to start from.
        mapping: ``{section: {key: value}}`` as read from YAML.
        source: file name or ``--set`` shown in error messages.

    Returns:
        A new frozen ``Config``.
    """
    if mapping is None:
        return cfg
    return _build(Config, _sections(mapping, source), "", source, cfg)


def _sections(mapping: Any, source: str) -> dict[str, Any]:
    """The config sections of a file's or a stored config's top level (``extends`` and ``description`` dropped)."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    return {k: v for k, v in mapping.items() if k not in ("extends", "description")}


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into a nested mapping; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: cannot parse value: {e}") from e
    out: dict[str, Any] = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load defaults, then an experiment file (and whatever it ``extends``), then ``--set`` overrides.

    Args:
        path: an experiment YAML file, or None for the defaults.
        overrides: ``section.key=value`` strings.

    Returns:
        The resolved frozen ``Config``.
    """
    cfg = Config()
    if path is not None:
        chain: list[Path] = []
        p: Path | None = Path(path)
        while p is not None:
            if p in chain:
                raise ConfigError(f"{p}: 'extends' cycle")
            chain.append(p)
            parent = read_yaml(p).get("extends")
            p = (p.parent / parent) if parent else None
        for p in reversed(chain):
            cfg = merge(cfg, read_yaml(p), str(p))
    for o in overrides:
        cfg = merge(cfg, parse_override(o), f"--set {o}")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""

    def conv(x: Any) -> Any:
        if is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return conv(cfg)


def from_dict(data: dict[str, Any], source: str = "stored config") -> Config:
    """Rebuild a ``Config`` from ``to_dict`` output (as stored in an artifact's manifest).

    Exactly what was stored: mappings are taken as they are (not merged into the defaults, as
    files and ``--set`` are); keys a stored config lacks (older versions) take their defaults.
    """
    return _build(Config, _sections(data, source), "", source)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a config (or any JSON-able object)."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_defaults(directory: str | Path) -> list[Path]:
    """Write ``configs/defaults/<section>.yaml`` from the dataclass defaults (run after changing them)."""
    out = []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for section, values in to_dict(Config()).items():
        p = directory / f"{section}.yaml"
        header = f"# Defaults of the '{section}' section (restating recsys/config.py; tests/test_config.py keeps them equal).\n"
        p.write_text(header + yaml.safe_dump({section: values}, sort_keys=False, default_flow_style=None))
        out.append(p)
    return out


if __name__ == "__main__":  # python -m recsys.config  → refresh configs/defaults
    for written in write_defaults(Path(__file__).resolve().parents[1] / "configs" / "defaults"):
        print(written)
