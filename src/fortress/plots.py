"""Figures from saved runs: user-representation trajectories over growing prefixes; item
embeddings of popular and target items (where a poisoning attack moves its targets)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fortress import config as config_mod
from fortress.errors import InputError
from fortress.models import from_config
from fortress.recommend import load_run
from fortress.simulate import pad_left


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'fortress[plot]'") from None
    return plt


def save(plt, fig, out: str | Path, dpi: int) -> Path:
    """Lay out, write and close a figure; returns its path."""
    fig.tight_layout()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    except OSError as err:
        raise InputError(f"--out {out}: cannot write the figure ({err.strerror or type(err).__name__})") from None
    except ValueError as err:          # matplotlib: an unknown file extension
        raise InputError(f"--out {out}: {' '.join(str(err).split())}") from None
    finally:
        plt.close(fig)
    return out


def load_runs(run_dirs: list[str | Path], what: str, why_same: str) -> tuple[list[Path], list[dict]]:
    """The saved models of runs with parameters, all on the same users and items (one-line errors)."""
    run_dirs = [Path(r) for r in run_dirs]
    blobs = [load_run(r) for r in run_dirs]
    for r, b in zip(run_dirs, blobs):
        if b["params"] is None:
            raise InputError(f"{r}: a {b['config']['training']} run has no {what} to plot")
        if b["item_ids"] != blobs[0]["item_ids"] or b["user_ids"] != blobs[0]["user_ids"]:
            raise InputError(f"{r}: trained on other data than {run_dirs[0]}; {why_same}")
    return run_dirs, blobs


def prefix_states(blob: dict, users: list[int]) -> list[torch.Tensor]:
    """Per user, the L2-normalised representation after each prefix of its known sequence: (n_u, d)."""
    cfg = config_mod.from_dict(blob["config"])
    model = from_config(cfg)
    out = []
    with torch.no_grad():
        for u in users:
            seq = blob["seq_items"][blob["seq_ptr"][u]:blob["seq_ptr"][u + 1]].numpy()
            prefixes = pad_left([seq[max(0, t + 1 - cfg.max_len):t + 1] for t in range(len(seq))])  # (n, L)
            out.append(F.normalize(model.last(blob["params"], prefixes).double(), dim=-1))       # (n, d)
    return out


def step_length(states: list[torch.Tensor]) -> float:
    """Mean distance between the representations of consecutive prefixes (unit vectors)."""
    steps = torch.cat([(s[1:] - s[:-1]).norm(dim=-1) for s in states])
    return float(steps.mean())


TRAINING = {"pop": "most popular", "central": "central", "ptf": "PTF-FSR"}
OBJECTIVES = {"next_item": "FedAvg", "fortress": "FORTRESS clients", "union": "UNION clients"}
BACKBONES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec"}


def describe(cfg: dict) -> str:
    """A run in words for a figure title: training, backbone, temporal term, defence, attack, seed."""
    how = TRAINING.get(cfg["training"]) or OBJECTIVES.get(cfg["objective"], cfg["objective"])
    parts = [f"{how}-{BACKBONES.get(cfg['backbone'], cfg['backbone'])}"]
    if cfg["training"] == "federated" and cfg["objective"] == "fortress":
        on = cfg["temporal"] and cfg["lambda_temp"] > 0
        parts.append(f"temporal term {'on (λ2=' + format(cfg['lambda_temp'], 'g') + ')' if on else 'off'}")
    if cfg.get("defence", "none") != "none":
        parts.append(f"defence {cfg['defence']}")
    if cfg.get("attack", "none") != "none":
        parts.append(f"attack {cfg['attack']} {cfg['attack_ratio'] * 100:g}%")
    return ", ".join(parts) + f", seed {cfg['seed']}"


def sample_users(blob: dict, n_users: int, min_len: int, seed: int) -> list[int]:
    """n_users users (sorted ids) with at least min_len known items, drawn with `seed`."""
    lengths = np.diff(blob["seq_ptr"].numpy())
    pool = np.flatnonzero(lengths >= min_len)
    if len(pool) == 0:
        raise InputError(f"no user has a sequence of at least {min_len} items")
    return sorted(np.random.default_rng(seed).choice(pool, min(n_users, len(pool)), replace=False).tolist())


def trajectories(run_dirs: list[str | Path], out: str | Path, n_users: int = 6, min_len: int = 8,
                 seed: int = 0) -> tuple[Path, dict[str, float]]:
    """One panel per run: prefix trajectories of the same sampled users, PCA to 2-D; a last panel: the
    step between consecutive prefixes per run (what a temporal term should shorten), as a PNG.

    Returns the PNG path and each run's mean step between consecutive prefixes of those users.
    """
    plt = pyplot()
    fig, steps = trajectory_figure(plt, run_dirs, n_users, min_len, seed)
    return save(plt, fig, out, 120), steps


def trajectory_figure(plt, run_dirs: list[str | Path], n_users: int, min_len: int, seed: int):
    """The trajectories figure and each run's mean step (see `trajectories`)."""
    run_dirs, blobs = load_runs(run_dirs, "user representations", "trajectories need the same users")
    users = sample_users(blobs[0], n_users, min_len, seed)
    lengths = np.diff(blobs[0]["seq_ptr"].numpy())
    steps, per_user = {}, []
    fig, axes = plt.subplots(1, len(blobs) + 1, figsize=(5 * (len(blobs) + 1), 5), squeeze=False)
    colours = plt.get_cmap("tab10")
    for n, (ax, r, blob) in enumerate(zip(axes[0], run_dirs, blobs)):
        states = prefix_states(blob, users)
        allp = torch.cat(states)                                                 # (P, d)
        mean = allp.mean(0)
        _, _, v = torch.linalg.svd(allp - mean, full_matrices=False)              # principal axes
        for i, (u, s) in enumerate(zip(users, states)):
            xy = ((s - mean) @ v[:2].T).numpy()                                   # (n, 2)
            c = colours(i % 10)
            ax.plot(xy[:, 0], xy[:, 1], "-", color=c, alpha=0.8, lw=1.2,
                    label=f"user {blob['user_ids'][u]} ({int(lengths[u])} items)")
            ax.scatter(xy[:, 0], xy[:, 1], s=np.linspace(6, 30, len(xy)), color=c, zorder=3)
            ax.annotate("", xy[-1], xy[-2], arrowprops=dict(arrowstyle="->", color=c))
        steps[str(r)] = step_length(states)
        per_user.append([float((s[1:] - s[:-1]).norm(dim=-1).mean()) for s in states])
        ax.set_title(f"({chr(97 + n)}) {describe(blob['config'])}", fontsize=9)
        ax.set_xlabel("PC 1 of the unit-normalised representations")
        ax.set_ylabel("PC 2 of the unit-normalised representations")
        ax.legend(fontsize=7, title="dots grow with the prefix; arrow: last step", title_fontsize=7)
    ax = axes[0, -1]
    x = np.arange(len(blobs))
    ax.bar(x, [steps[str(r)] for r in run_dirs], yerr=[float(np.std(p, ddof=1)) if len(p) > 1 else 0.0
                                                         for p in per_user],
           capsize=4, color="0.7", label="mean over all steps ± std over users")
    for n, p in enumerate(per_user):
        ax.scatter(np.full(len(p), n), p, s=14, color=[colours(i % 10) for i in range(len(p))], zorder=3,
                   label="each user's mean step" if n == 0 else None)
    ax.set_xticks(x, [f"({chr(97 + n)})" for n in range(len(blobs))])
    ax.set_xlabel("run (panels to the left)")
    ax.set_ylabel("step between consecutive prefixes\n(chord distance of unit vectors, 0 to 2)")
    ax.set_ylim(bottom=0)
    ax.set_title("how far a representation moves per new item\n(shorter = smoother trajectory)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"User representations over growing prefixes: {len(users)} users with ≥ {min_len} items, "
                 "the same users in every run, PCA per run", fontsize=10)
    return fig, steps


def run_targets(run_dir: Path, blob: dict, explicit: list[str] | None) -> list[int]:
    """Target item indices: `explicit` original ids, else the attack section of RUN_DIR/results.json."""
    if explicit:
        index = {name: i for i, name in enumerate(blob["item_ids"]) if i > 0}
        unknown = [t for t in explicit if t not in index]
        if unknown:
            raise InputError(f"--targets: item id(s) {', '.join(unknown)} are not in the data of {run_dir}")
        return [index[t] for t in explicit]
    res = Path(run_dir) / "results.json"
    attack = json.loads(res.read_text()).get("attack") if res.is_file() else None
    if not attack or not attack.get("target_index"):
        raise InputError(f"{run_dir}: no targets in results.json (a run with targets >= 1); pass --targets ID,...")
    return [int(t) for t in attack["target_index"]]


def popular_distances(table: torch.Tensor, popular: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(len(items), |P|) chord distances between the directions (unit vectors) of items and popular
    items: sqrt(2) = orthogonal. Our models score by dot product, so direction is what an attack
    turns toward the popular items (its length it inflates; the scatter shows that)."""
    unit = F.normalize(table.double(), dim=1)
    return torch.cdist(unit[items], unit[popular])


def embeddings(run_dirs: list[str | Path], out: str | Path, popular_frac: float = 0.02,
               targets: list[str] | None = None, sample: int = 3000, seed: int = 0) -> tuple[Path, dict[str, dict]]:
    """Per run: item embeddings in 2-D (PCA) with popular / target / other items marked, and a
    histogram of target-to-popular distances against other unpopular items' (the reference).

    Popular = the popular_frac items with the most training interactions (the experimenter's view).
    Returns the PNG path and per run the targets' median chord distance to the popular items, the
    share of other items whose direction is closer to the popular items than the targets', and
    the targets' length in popular median norms.
    """
    plt = pyplot()
    fig, stats = embedding_figure(plt, run_dirs, popular_frac, targets, sample, seed)
    return save(plt, fig, out, 110), stats


def embedding_figure(plt, run_dirs: list[str | Path], popular_frac: float, targets: list[str] | None,
                     sample: int, seed: int):
    """The embeddings figure and its per-run statistics (see `embeddings`)."""
    run_dirs, blobs = load_runs(run_dirs, "item embeddings", "the figure compares the same items")
    counts = blobs[0]["pop_counts"].double()                                     # (N+1,)
    n_items = len(counts) - 1
    k = max(1, int(np.ceil(popular_frac * n_items)))
    popular = torch.argsort(-counts[1:], stable=True)[:k] + 1                    # (k,)
    rng = np.random.default_rng(seed)
    stats: dict[str, dict] = {}
    fig, axes = plt.subplots(2, len(blobs), figsize=(5.5 * len(blobs), 9), squeeze=False)
    for col, (r, blob) in enumerate(zip(run_dirs, blobs)):
        tgt = torch.as_tensor(run_targets(r, blob, targets))
        table = blob["params"]["item_emb"].double()                              # (N+1, d)
        rest = np.setdiff1d(np.arange(1, n_items + 1), np.concatenate([popular.numpy(), tgt.numpy()]))
        rest = torch.as_tensor(np.sort(rng.choice(rest, min(sample, len(rest)), replace=False)))
        mean = table[1:].mean(0)
        _, _, v = torch.linalg.svd(table[1:] - mean, full_matrices=False)        # principal axes of all items
        xy = lambda ids: ((table[ids] - mean) @ v[:2].T).numpy()                 # noqa: E731 (n, 2)
        ax = axes[0, col]
        ax.scatter(*xy(rest).T, s=3, color="0.75", label=f"other items ({len(rest)} sampled)")
        ax.scatter(*xy(popular).T, s=10, color="tab:blue", label=f"popular (top {k} by train count)")
        ax.scatter(*xy(tgt).T, s=160, marker="*", color="tab:red", edgecolor="k", label="target")
        ax.set_title(describe(blob["config"]), fontsize=9)
        ax.set_xlabel("PC 1 of the item embeddings")
        ax.set_ylabel("PC 2 of the item embeddings")
        ax.legend(fontsize=7, loc="best")
        d_t = popular_distances(table, popular, tgt)                             # (T, k)
        d_r = popular_distances(table, popular, rest)                            # (R, k)
        ax = axes[1, col]
        bins = np.linspace(0, 2, 41)
        ax.hist(d_r.flatten().numpy(), bins=bins, density=True, color="0.7", label="other items to popular")
        ax.hist(d_t.flatten().numpy(), bins=bins, density=True, color="tab:red", alpha=0.6, label="targets to popular")
        med_t = float(d_t.median())
        closer = float((d_r.median(1).values < med_t).double().mean())
        length = float(table[tgt].norm(dim=1).mean() / table[popular].norm(dim=1).median())
        ax.axvline(med_t, color="tab:red", ls="--", label="targets' median")
        ax.set_xlabel("chord distance to popular items' directions (0 to 2; √2 = orthogonal)")
        ax.set_ylabel("density (per unit of distance)")
        ax.set_title(f"targets' median distance {med_t:.2f}; {closer:.0%} of other items are closer;\n"
                     f"target length {length:.2f} popular norms", fontsize=9)
        ax.legend(fontsize=7)
        stats[str(r)] = {"target_median_distance": med_t, "other_items_closer": closer, "target_length": length}
    fig.suptitle("Item embeddings (PCA of all items per run) and the directions' target-to-popular distances",
                 fontsize=10)
    return fig, stats
