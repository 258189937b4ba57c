"""One frozen dataclass of defaults; TOML files and `--set key=value` overrides, type-checked."""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fortress.errors import InputError


@dataclass(frozen=True)
class Config:
    # what to run
    training: str = "federated"     # pop | central | federated | ptf: how the model is trained (TRAINING)
    objective: str = "next_item"    # next_item | fortress | union | fedcl: the loss an honest client minimises (client.OBJECTIVES);
                                    # cl4srec: the centralised contrastive reference (training=central only)
    backbone: str = "sasrec"        # sasrec | gru4rec
    seed: int = 0
    init_from: str = ""             # start from the model of a saved run (its folder or model.pt)
    # data
    data_format: str = "auto"       # auto | seq | table | mind | split | recbole
    kcore: int = 0                  # k-core filter on users and items (0 = off)
    max_len: int = 50               # most recent items a model sees
    whole_history: bool = False     # true: train on every train item, each user's whole sequence cut into windows of
                                    # max_len (client.train_windows); false: only its last max_len + 1 items (README)
    synthetic_users: int = 5000
    synthetic_items: int = 1000
    synthetic_len: int = 9          # mean sequence length of the synthetic data (> 5)
    synthetic_taste: float = 0.0    # share of non-transition steps drawn from the user's home genre
    # model
    dim: int = 64
    blocks: int = 2                 # SASRec attention blocks / GRU4Rec layers (GRU uses 1)
    heads: int = 1
    dropout: float = 0.2
    dtype: str = "float32"          # float32 | float64 (float64 for equivalence tests)
    # federated rounds
    rounds: int = 300
    clients_per_round: int = 256
    local_epochs: int = 1
    lr: float = 1.0                 # client learning rate (fedavg)
    central_lr: float = 0.001       # Adam learning rate (central)
    client_opt: str = "sgd"         # sgd | adam: the optimiser a device runs, fresh each round
    n_neg: int = 512                # negatives a client samples into its item sub-table
    neg_correction: bool = True     # logQ-correct the sampled negatives (objectives.sampled_softmax_bias)
    global_opt: str = "sgd"         # sgd | adam: how the server applies the aggregate (FedAvg = sgd, global_lr 1)
    global_lr: float = 1.0
    engine: str = "vmap"            # vmap | loop (reference)
    chunk_size: int = 64            # clients trained together in one vmap call
    hold_clients: int = 1024        # above this many clients a round, none / norm_bound / fortress read uploads as trained
    # faults: bad uploads, drop-outs, checkpoints (the *_rate keys inject faults, for testing)
    max_update_norm: float = 1e4    # reject a client whose update (encoder + its rows) has a larger L2 norm; 0 = off
    min_answered: float = 0.5       # a round applies only if this fraction of sampled clients sent a valid update
    drop_rate: float = 0.0          # chance that a sampled client never answers (fault injection)
    corrupt_rate: float = 0.0       # chance that an answering client uploads garbage (fault injection)
    checkpoint_every: int = 0       # rounds between atomic checkpoints in the output folder; 0 = off
    # FORTRESS client objective (objective=fortress): L_rec + lambda_cl (L_seq + L_user + L_item) + lambda_temp L_temp
    lambda_cl: float = 0.02         # weight of the three contrastive views
    lambda_temp: float = 0.01       # weight of the temporal regulariser
    lambda_schedule: str = "constant"   # constant | decay: lambda_cl and lambda_temp fall linearly to 0 over `rounds`
    tau: float = 0.5                # InfoNCE temperature (cosine similarity)
    view_negatives: str = "items"   # items | prefixes: what the sequence and user views push away from (objectives.py)
    user_noise_std: float = 0.5     # sigma of the user view's Gaussian noise
    item_eps: float = 0.1           # norm of the item view's gradient-direction perturbation
    crop_ratio: float = 0.6         # sequence view: fraction of the sequence a crop keeps
    mask_ratio: float = 0.3         # sequence view: fraction of items replaced by the mask token
    reorder_ratio: float = 0.6      # sequence view: fraction of the sequence a reorder shuffles
    temp_window: int = 3            # temporal regulariser: sliding-window width (items)
    temp_stride: int = 1            # temporal regulariser: step between adjacent windows
    seq_view: bool = True           # ablation switches: each term on/off
    user_view: bool = True
    item_view: bool = True
    temporal: bool = True
    # UNION's client term (objective=union; objectives.union_loss): L_rec + union_lambda L_union
    union_lambda: float = 1.0       # weight of the contrastive item-embedding term
    union_negatives: int = 15       # negatives per anchor item, drawn from the client's sampled negatives
    union_tau: float = 0.5          # its temperature (cosine similarity)
    # FedCL (objective=fedcl; server/fedcl.py): clients upload LDP-perturbed user representations, the server
    # clusters them and sends hard negatives; L_rec + fedcl_lambda L_fedcl
    fedcl_lambda: float = 0.1       # weight of the hard-negative contrastive term; 0 = FedAvg (no exchange); 1 (the
                                    # paper's single loss; the default until 2026-12-03) diverges from scratch on
                                    # amazon-cell-phones and on the synthetic data (README "Peer methods")
    fedcl_clip: float = 1.0         # LDP: clip each user representation to this L2 norm (delta)
    fedcl_noise: float = 0.1        # LDP: scale (lambda) of the Laplace noise added to each coordinate; 0 = none
    fedcl_clusters: int = 8         # k-means clusters of the round's representations (at most the clients)
    fedcl_hard: int = 32            # hard negatives the server retrieves per cluster centroid
    # PTF-FSR (training=ptf; fortress/ptf.py): clients and server share predictions, each keeps its own model
    ptf_client_backbone: str = "gru4rec"   # a client's own model (the server's is `backbone`, `dim`, ...)
    ptf_client_dim: int = 8
    ptf_client_lr: float = 0.01     # a client's Adam learning rate (fresh state each round; `local_epochs` steps)
    ptf_replace: float = 0.5        # chance that an uploaded input item is replaced by a draw from the client's model
    ptf_epsilon: float = 1.0        # that draw is softmax(ptf_epsilon x logits): 0 = uniform over the items it knows
    ptf_candidates: int = 10        # perturbed sequences a client draws; it uploads the one that best predicts its last item
    ptf_server_epochs: int = 2      # passes of the server's model over a round's uploads (Adam at central_lr, batch_size)
    ptf_kd_negatives: int = 1       # random items the server scores beside each next item of the knowledge it sends
    # centralised training
    epochs: int = 100               # the most epochs; with patience, early stopping usually ends sooner
    batch_size: int = 128
    cl4srec_lambda: float = 0.1     # objective=cl4srec: weight of the contrastive term (CL4SRec / RecBole default)
    cl4srec_tau: float = 1.0        # objective=cl4srec: temperature of its in-batch softmax (dot product)
    patience: int = 5               # validate every epoch, stop after this many without a better valid NDCG@10 and
                                    # restore the best epoch's model; 0 = off (validate every eval_every epochs)
    fed_patience: int = 0           # federated: stop after this many validations (every eval_every rounds) without a
                                    # better valid NDCG@10 and restore the best one's model; 0 = off (all rounds)
    # evaluation
    eval_every: int = 25            # rounds (fedavg) or epochs (central) between validation passes; 0 = end only
    eval_batch: int = 2048          # users scored at once
    threads: int = 0                # torch threads; 0 = the idle cores this process may use (simulate.torch_threads)
    device: str = "cpu"             # cpu | cuda | auto (cuda where available): where training, evaluation, FedAvg and the robust rules run (FORTRESS, UNION, HiCS and the attacks stay on the CPU)
    # poisoning attacks (fedavg; fortress/attacks explains each one and its choices)
    attack: str = "none"            # none | ahum | psmu | random | popular | boost | stealth | ramp | weight | adaptive
    attack_ratio: float = 0.01      # malicious clients as a fraction of benign users (>= 1 client when > 0)
    targets: int = 1                # target items whose ER@K is tracked (fedavg; 0 = no tracking)
    target_pick: str = "unpopular"  # unpopular | random | comma-separated item ids as in the data
    attack_scale: float = 1.0       # factor on the uploads of ahum and psmu (1 = as computed; see attacks/base.py)
    attack_len: int = 10            # length of a fake sequence; also the weight a malicious client reports
    attack_users: int = 10          # ahum: hard users each malicious client mines
    attack_steps: int = 30          # ahum: gradient steps of hard-user mining
    attack_alternatives: int = 20   # psmu: competing items (the fake user's top-K) pushed below the target
    attack_pool: int = 32           # psmu: histories sampled from the model per fake user; the hardest is kept
    # server defence (fedavg; fortress/server/defences.py explains each one)
    defence: str = "none"           # none | fortress | median | trimmed_mean | krum | multi_krum | norm_bound | union | hics
    trim_frac: float = 0.1          # trimmed_mean: share of each coordinate's values cut at each end
    byz_frac: float = 0.1           # krum, multi_krum, union: assumed share of Byzantine contributors (f = floor(byz_frac n))
    norm_bound: float = 0.0         # norm_bound: clip each client's update to this L2 norm; 0 = the round's median norm
    union_items: int = 500          # union: items sampled each round to measure each client's uniformity
    union_refs: int = 50            # union: uniform reference sets of the Gap statistic
    hics_item_clip: float = 1.0     # hics: clip each row to this x the round's median largest row norm of a client
    hics_keep: float = 0.1          # hics: share of each client's rows kept (the largest; the rest zeroed)
    hics_user_clip: float = 1.0     # hics: clip each client's update to this x the round's median norm
    # the FORTRESS server (server/fortress.py): bounded contributions, pusher-count monitor, L_sep + L_var
    popular_frac: float = 0.02      # popular set P: this share of the catalogue with the largest popularity rate
    row_clip: float = 1.0           # clip each row contribution (weight x delta) to row_clip x the round's median largest one
    dense_clip: float = 1.5         # clip each encoder contribution to dense_clip x the round's median one
    push_frac: float = 0.05         # a row is a push (its client's encoder follows the item's flag) when >= push_frac x the row clip
    p_flag: float = 1e-3            # flag an item whose push mass has Poisson tail probability < p_flag at its rate
    floor_frac: float = 0.5         # an item's rate is at least floor_frac x the round's mean push mass per item
    alpha: float = 1.0              # weight of L_sep (keep suspicious items at least `margin` from popular ones)
    beta: float = 0.1               # weight of L_var (keep each popular item near its knn popular neighbours)
    margin: float = 1.4             # L_sep margin: chord distance between unit embeddings (sqrt(2) = orthogonal)
    knn: int = 5                    # popular neighbours in L_var
    server_steps: int = 5           # server gradient steps on alpha L_sep + beta L_var per round (when something is flagged)
    server_lr: float = 0.5          # their step size (on unit vectors; each row keeps its length)
    probe_users: int = 128          # exposure cap: synthetic probe users scored after each round (0 = no cap)
    exposure_cap: float = 10.0      # an item may reach this many times the median probe exposure its rate buys
    reach_cap: float = 0.0          # ... and at most this many times the probe users the REACH_RANK-th most seen item reaches (0 = off; opt-in)


TRAINING = ("pop", "central", "federated", "ptf")   # most-popular counts, centralised Adam, federated rounds, PTF-FSR
CHOICES: dict[str, tuple[str, ...]] = {
    "training": TRAINING,
    "dtype": ("float32", "float64"),
    "client_opt": ("sgd", "adam"),
    "global_opt": ("sgd", "adam"),
    "engine": ("vmap", "loop"),
    "device": ("cpu", "cuda", "auto"),
    "view_negatives": ("items", "prefixes"),
    "lambda_schedule": ("constant", "decay"),
}
CENTRAL_OBJECTIVES = ("cl4srec",)   # objectives of central training only (simulate.train_central)

# `mode` named both how we train and the client objective; it is now the two keys above
OLD_MODE = {"pop": {"training": "pop"}, "central": {"training": "central"},
            "fedavg": {"training": "federated", "objective": "next_item"},
            "fortress": {"training": "federated", "objective": "fortress"}}


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values per key; those of data_format, backbone, objective, attack and defence come from their
    registries."""
    from fortress.attacks import ATTACKS
    from fortress.client import OBJECTIVES
    from fortress.data.load import FORMATS
    from fortress.models import BACKBONES
    from fortress.server.defences import DEFENCES
    return {**CHOICES, "data_format": FORMATS, "backbone": tuple(BACKBONES), "ptf_client_backbone": tuple(BACKBONES),
            "objective": tuple(OBJECTIVES) + CENTRAL_OBJECTIVES,
            "attack": ("none", *ATTACKS), "defence": tuple(DEFENCES)}
# lower bounds (inclusive) for numbers; everything else numeric must be >= 0
MINIMUM: dict[str, float] = {
    "max_len": 2, "synthetic_users": 10, "synthetic_items": 10, "synthetic_len": 6, "dim": 2, "blocks": 1, "heads": 1,
    "rounds": 0, "clients_per_round": 1, "local_epochs": 1, "n_neg": 1, "chunk_size": 1,
    "epochs": 0, "batch_size": 1, "eval_batch": 1, "temp_window": 1, "temp_stride": 1, "attack_len": 2,
    "attack_users": 1, "attack_pool": 1, "knn": 1, "union_negatives": 1, "union_items": 2, "union_refs": 2,
    "fedcl_clusters": 1, "fedcl_hard": 1,
    "ptf_client_dim": 2, "ptf_candidates": 1, "ptf_server_epochs": 1, "ptf_kd_negatives": 1,
}
INT_MAX = 2**31 - 1
POSITIVE = ("lr", "central_lr", "global_lr", "tau", "cl4srec_tau", "attack_scale", "row_clip", "dense_clip", "p_flag",
            "floor_frac", "exposure_cap", "union_tau", "hics_item_clip", "hics_keep", "hics_user_clip", "fedcl_clip",
            "ptf_client_lr")


def keys() -> list[str]:
    return [f.name for f in fields(Config)]


def _parse_value(key: str, raw: Any, kind: type) -> Any:
    """Convert a TOML value or a `--set` string to the field's type, or raise a one-line error."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise InputError(f"{key}={raw!r}: expected true or false")
    if kind is int:
        if isinstance(raw, bool):
            raise InputError(f"{key}={raw!r}: expected an integer")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw))
        except ValueError:
            raise InputError(f"{key}={raw!r}: expected an integer") from None
    if kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise InputError(f"{key}={raw!r}: expected a number") from None
    return str(raw)


def _field_types() -> dict[str, type]:
    types = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: types[f.type] if isinstance(f.type, str) else f.type for f in fields(Config)}


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raise InputError naming the key, the value and what is allowed."""
    for key, allowed in choices().items():
        value = getattr(cfg, key)
        if value not in allowed:
            raise InputError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}", (key,))
    for key, kind in _field_types().items():
        value = getattr(cfg, key)
        if kind in (int, float):
            low = MINIMUM.get(key, 0)
            bound = "> 0" if key in POSITIVE else f">= {low:g}"
            if kind is float and not math.isfinite(value):     # NaN compares false with every bound
                raise InputError(f"{key}={value!r} is not a finite number; it must be {bound}", (key,))
            if value < low or (key in POSITIVE and value <= 0):
                raise InputError(f"{key}={value!r} is out of range; it must be {bound}", (key,))
            if kind is int and value > INT_MAX:     # torch and numpy take 32/64-bit ints; larger ones crash there
                raise InputError(f"{key}={value!r} is out of range; it must be <= {INT_MAX}", (key,))
    if not 0.0 <= cfg.dropout < 1.0:
        raise InputError(f"dropout={cfg.dropout!r} is out of range; it must be in [0, 1)", ("dropout",))
    for key in ("synthetic_taste", "drop_rate", "corrupt_rate", "min_answered", "popular_frac", "byz_frac", "push_frac", "p_flag",
                "hics_keep", "ptf_replace"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise InputError(f"{key}={getattr(cfg, key)!r} is out of range; it must be in [0, 1]", (key,))
    for key in ("crop_ratio", "mask_ratio", "reorder_ratio"):
        if getattr(cfg, key) > 1.0:
            raise InputError(f"{key}={getattr(cfg, key)!r} is out of range; it must be in [0, 1]", (key,))
    if cfg.objective == "fortress" and cfg.temporal and cfg.temp_window > cfg.max_len:
        raise InputError(f"temp_window={cfg.temp_window} must be <= max_len={cfg.max_len}", ("temp_window", "max_len"))
    if cfg.trim_frac >= 0.5:
        raise InputError(f"trim_frac={cfg.trim_frac!r} is out of range; it must be in [0, 0.5)", ("trim_frac",))
    if cfg.objective == "union" and cfg.whole_history and cfg.training == "federated":
        raise InputError("objective='union' reads one window per client; it does not take whole_history=true yet",
                         ("objective", "whole_history"))
    if cfg.objective in CENTRAL_OBJECTIVES and cfg.training != "central":
        raise InputError(f"objective={cfg.objective!r} contrasts the users of a batch with each other, which no "
                         f"federated client can; it needs training='central' (got training={cfg.training!r})",
                         ("objective", "training"))
    for key, value in (("defence", cfg.defence), ("objective", cfg.objective)):
        if value in CENTRAL_OBJECTIVES:
            continue
        if value != getattr(Config, key) and cfg.training != "federated":
            raise InputError(f"{key}={value!r} needs training='federated' (got training={cfg.training!r})",
                             (key, "training"))
    if cfg.training == "ptf":
        _validate_ptf(cfg)
    if cfg.dim % cfg.heads:
        raise InputError(f"dim={cfg.dim} must be divisible by heads={cfg.heads}", ("dim", "heads"))
    _validate_attack(cfg)
    return cfg


def check_device(cfg: Config) -> None:
    """device=cuda where torch sees no GPU: one line. Asked where a config is about to run (`simulate.run`,
    `fortress experiment`), not by `validate`, so a GPU spec's report can be rebuilt on a machine without one."""
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError(f"device='cuda': CUDA is not available here (torch {torch.__version__}); "
                             "use device=cpu, or auto to take CUDA where there is one", ("device",))


def _validate_attack(cfg: Config) -> None:
    if cfg.attack_ratio > 1:
        raise InputError(f"attack_ratio={cfg.attack_ratio!r} is out of range; it must be in [0, 1]", ("attack_ratio",))
    if cfg.target_pick not in ("unpopular", "random"):
        from fortress.attacks import target_list
        ids = target_list(cfg.target_pick)
        if not ids:
            raise InputError(f"target_pick={cfg.target_pick!r}: choose unpopular, random, or a "
                             "comma-separated list of item ids", ("target_pick",))
        if len(ids) != cfg.targets:
            raise InputError(f"target_pick lists {len(ids)} item(s) but targets={cfg.targets}; "
                             f"set targets={len(ids)}", ("target_pick", "targets"))
    if cfg.attack != "none" and cfg.training not in ("federated", "ptf"):
        raise InputError(f"attack={cfg.attack!r} needs training='federated' (got training={cfg.training!r})",
                         ("attack", "training"))
    if cfg.attack != "none" and cfg.targets < 1:
        raise InputError(f"attack={cfg.attack!r} needs targets >= 1", ("attack", "targets"))


# federated keys PTF-FSR does not take, and why (they must keep their defaults with training=ptf)
PTF_REFUSES = {"whole_history": "a PTF client perturbs and uploads its last max_len + 1 items only",
               "checkpoint_every": "its clients' own models are not checkpointed, so a PTF run cannot resume",
               "drop_rate": "fault injection acts on federated uploads",
               "corrupt_rate": "fault injection acts on federated uploads"}


def _validate_ptf(cfg: Config) -> None:
    from fortress.ptf import ATTACKS
    for key, why in PTF_REFUSES.items():
        if getattr(cfg, key) != getattr(Config, key):
            raise InputError(f"{key}={getattr(cfg, key)!r} does not apply to training='ptf' ({why}); "
                             f"leave it at {getattr(Config, key)!r}", (key, "training"))
    if cfg.attack not in ("none", *ATTACKS):
        raise InputError(f"attack={cfg.attack!r} uploads model updates, but under training='ptf' clients upload item "
                         f"sequences, not parameters; the attacks that apply there: {', '.join(ATTACKS)}",
                         ("attack", "training"))


def _parse_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Typed values of known keys; an unknown key or a bad value is a one-line error naming `source`."""
    types = _field_types()
    changes = {}
    for key, raw in values.items():
        if key == "mode":
            new = " ".join(f"{k}={v}" for k, v in OLD_MODE.get(str(raw), {"training": "?", "objective": "?"}).items())
            raise InputError(f"{source}: mode={raw!r}: `mode` is now two keys, training and objective; "
                             f"write {new}", (key,))
        if key not in types:
            close = difflib.get_close_matches(key, keys(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{source}: unknown key {key!r}{hint}; known keys: {', '.join(keys())}", (key,))
        try:
            changes[key] = _parse_value(key, raw, types[key])
        except InputError as err:
            raise InputError(f"{source}: {err}", (key,)) from None
    return changes


def _checked(cfg: Config, sources: dict[str, str]) -> Config:
    """validate(cfg), with the source (file or --set) of the offending key in front of an error."""
    try:
        return validate(cfg)
    except InputError as err:
        source = next((sources[k] for k in err.keys if k in sources), None)
        if source is None:
            raise
        raise InputError(f"{source}: {err}", err.keys) from None


def override(cfg: Config, values: dict[str, Any], source: str = "--set") -> Config:
    """Return cfg with `values` applied; unknown keys and bad values are one-line errors naming `source`."""
    changes = _parse_values(values, source)
    return _checked(dataclasses.replace(cfg, **changes), dict.fromkeys(changes, source))


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """`key=value` strings as a dict; a pair without `=` or without a key is a one-line error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {pair!r}: expected key=value, e.g. --set rounds=50")
        out[key.strip()] = value.strip()
    return out


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The table of a TOML file; a missing, unreadable, non-text or malformed file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a TOML {what}")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read {what} ({err.strerror or type(err).__name__})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a TOML {what} (not UTF-8 text: bad byte at offset {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None


def load(path: str | Path | None = None, sets: list[str] | None = None, base: Config | None = None) -> Config:
    """Defaults <- TOML file (flat table of keys) <- `--set key=value` overrides, validated together."""
    cfg = base or Config()
    sources: dict[str, str] = {}
    changes: dict[str, Any] = {}
    if path is not None:
        table = read_toml(path)
        nested = [k for k, v in table.items() if isinstance(v, dict)]
        if nested:
            raise InputError(f"{path}: config must be a flat table of keys; found section [{nested[0]}]")
        changes = _parse_values(table, str(path))
        sources = dict.fromkeys(changes, str(path))
    if sets:
        given = _parse_values(parse_sets(sets), "--set")
        changes.update(given)
        sources.update(dict.fromkeys(given, "--set"))
    return _checked(dataclasses.replace(cfg, **changes), sources)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config (results.json, model.pt, checkpoint.pt) in today's keys: an old `mode` becomes its two keys,
    and a whole config saved before `whole_history` existed (it has max_len) gets whole_history=false, what it was
    trained with."""
    if "max_len" in values and "whole_history" not in values:
        values = {**values, "whole_history": False}
    if "mode" not in values:
        return values
    rest = {k: v for k, v in values.items() if k != "mode"}
    return {**OLD_MODE.get(values["mode"], {"training": values["mode"]}), **rest}


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a saved config; keys this version does not know are an error, not silently dropped."""
    return override(Config(), upgrade(values), source="saved config")
