"""Figures from saved runs: user-representation trajectories over growing prefixes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fortress import config as config_mod
from fortress.errors import InputError
from fortress.models import from_config
from fortress.recommend import load_run
from fortress.simulate import pad_left


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


def label(blob: dict, run_dir: Path) -> str:
    cfg = blob["config"]
    if cfg["mode"] == "fortress":
        temp = f"temporal on (λ2={cfg['lambda_temp']:g})" if cfg["temporal"] and cfg["lambda_temp"] > 0 else "temporal off"
    else:
        temp = "no temporal term"
    return f"{run_dir.name}: {cfg['mode']}/{cfg['backbone']}, {temp}"


def sample_users(blob: dict, n_users: int, min_len: int, seed: int) -> list[int]:
    """n_users users (sorted ids) with at least min_len known items, drawn with `seed`."""
    lengths = np.diff(blob["seq_ptr"].numpy())
    pool = np.flatnonzero(lengths >= min_len)
    if len(pool) == 0:
        raise InputError(f"no user has a sequence of at least {min_len} items")
    return sorted(np.random.default_rng(seed).choice(pool, min(n_users, len(pool)), replace=False).tolist())


def trajectories(run_dirs: list[str | Path], out: str | Path, n_users: int = 6, min_len: int = 8,
                 seed: int = 0) -> tuple[Path, dict[str, float]]:
    """One panel per run: prefix trajectories of the same sampled users, PCA to 2-D, as a PNG.

    Returns the PNG path and each run's mean step between consecutive prefixes of those users.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'fortress[plot]'") from None
    run_dirs = [Path(r) for r in run_dirs]
    blobs = [load_run(r) for r in run_dirs]
    for r, b in zip(run_dirs, blobs):
        if b["params"] is None:
            raise InputError(f"{r}: a {b['config']['mode']} run has no user representations to plot")
        if b["item_ids"] != blobs[0]["item_ids"] or b["user_ids"] != blobs[0]["user_ids"]:
            raise InputError(f"{r}: trained on other data than {run_dirs[0]}; trajectories need the same users")
    users = sample_users(blobs[0], n_users, min_len, seed)
    steps = {}
    fig, axes = plt.subplots(1, len(blobs), figsize=(5.5 * len(blobs), 5), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, r, blob in zip(axes[0], run_dirs, blobs):
        states = prefix_states(blob, users)
        allp = torch.cat(states)                                                 # (P, d)
        mean = allp.mean(0)
        _, _, v = torch.linalg.svd(allp - mean, full_matrices=False)              # principal axes
        for i, s in enumerate(states):
            xy = ((s - mean) @ v[:2].T).numpy()                                   # (n, 2)
            c = colours(i % 10)
            ax.plot(xy[:, 0], xy[:, 1], "-", color=c, alpha=0.8, lw=1.2)
            ax.scatter(xy[:, 0], xy[:, 1], s=np.linspace(6, 30, len(xy)), color=c, zorder=3)
            ax.annotate("", xy[-1], xy[-2], arrowprops=dict(arrowstyle="->", color=c))
        steps[str(r)] = step_length(states)
        ax.set_title(f"{label(blob, r)}\nmean step between prefixes {steps[str(r)]:.3f}", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.suptitle(f"User representations of growing prefixes ({len(users)} users with >= {min_len} items, "
                 "unit-normalised, PCA per run)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out, steps
