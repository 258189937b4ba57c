"""In-process runs: pop baseline, centralised training, federated rounds, and PTF-FSR rounds (`fortress.ptf`).

A federated round: sample clients (benign and, under attack, malicious) -> build their sub-tables
-> local training (vmap or loop) -> malicious uploads (fortress.attacks) -> check uploads ->
aggregate (FedAvg or the `defence`) -> apply -> every `eval_every` rounds, validate (and measure
the targets' ER@K).
Every run writes `results.json` and `model.pt` into its output folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from fortress import attacks, checkpoint, ptf
from fortress import config as config_mod
from fortress.client import eligible_clients, train_windows
from fortress.config import Config
from fortress.data.dataset import Dataset
from fortress.errors import InputError
from fortress.memory import keep_freed_memory
from fortress.metrics import KS, Scorer, Strata, Sums, evaluate, from_sums, rank_sums, strata
from fortress.models import Model, Params, from_config
from fortress.objectives import cl4srec_loss, next_item_loss
from fortress.population import Population, hosted
from fortress.rounds import (Collected, ServerResult, client_step, fedcl_exchange, malicious_step, merge, sample_clients,
                            server_step, split_sampled)
from fortress.server import defences
from fortress.server.aggregate import GlobalOptimizer

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SHORT = 5        # benign clients with at most this many train interactions are reported apart (defence logs)


TORCH_THREADS = torch.get_num_threads()    # torch's own default (physical cores, or OMP_NUM_THREADS), before any run


def auto_threads(cores: int, load: float, ceiling: int = TORCH_THREADS) -> int:
    """Torch threads for `threads=0`: the `cores` this process may use less the busy ones (`load`, the
    1-minute load average), rounded, at least 1 and at most `ceiling`.

    Why not every core: torch's threads meet at a barrier after every operation, so when other
    processes hold the cores a round waits for the slowest thread; on a busy machine one thread
    is several times faster than all of them (README, Reference: Threads).
    """
    return max(1, min(cores, ceiling, int(cores - load + 0.5)))


def torch_threads(threads: int) -> int:
    """`threads` itself, or for 0 `auto_threads` of this process's CPU affinity and the load average."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:        # no load average on this platform: assume an idle machine
        load = 0.0
    return auto_threads(cores, load)


def torch_device(name: str) -> torch.device:
    """The device `device=name` means here: auto takes CUDA where there is one (config refuses cuda where not)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_torch(cfg: Config) -> None:
    """Threads, the seed, and on a GPU torch's deterministic kernels: CUDA's atomic adds (index_add_, the embedding
    backward) sum in a varying order, so without them two runs of a seed part in the last bits by round 4 and drift
    apart (tests/test_cuda.py). CPU runs leave the setting as it is (their kernels are deterministic already)."""
    torch.set_num_threads(torch_threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    if torch_device(cfg.device).type == "cuda":
        torch.use_deterministic_algorithms(True)
    keep_freed_memory()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pad_left(seqs: list[np.ndarray], length: int | None = None) -> torch.Tensor:
    """Stack sequences into (B, L) left-padded with 0 (L = longest, or `length`)."""
    L = length or max(1, max(len(s) for s in seqs))
    out = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, L - len(s):] = s[-L:]
    return torch.from_numpy(out)


@dataclass
class ModelScorer:
    """Scores of every item for users at a split, from their last max_len history items.

    Also `represent` + `score`, so that an evaluation encodes many users at once and scores them
    in smaller blocks (metrics.rank_sums).
    """

    model: Model
    params: Params
    ds: Dataset

    @torch.no_grad()
    def represent(self, users: np.ndarray, split: str, group: int = 256) -> torch.Tensor:
        """(B, d), encoded `group` users at a time, each group padded to its own longest history."""
        hists = [self.ds.history(int(u), split)[-self.model.max_len:] for u in users]
        dev = self.params["item_emb"].device
        return torch.cat([self.model.last(self.params, pad_left(hists[a:a + group]).to(dev))
                          for a in range(0, len(hists), group)])                   # (B, d)

    @torch.no_grad()
    def score(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.score(self.params, h)                                    # (B, N+1)

    def __call__(self, users: np.ndarray, split: str) -> torch.Tensor:
        return self.score(self.represent(users, split))


def model_scorer(model: Model, params: Params, ds: Dataset) -> ModelScorer:
    return ModelScorer(model, params, ds)


def pop_scorer(ds: Dataset):
    counts = torch.as_tensor(ds.item_counts(), dtype=torch.float32)   # exact below 2**24
    return lambda users, split: counts.repeat(len(users), 1)


def training_pairs(ds: Dataset, max_len: int, whole_history: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Central training's examples: each eligible user's windows (`train_windows`) and, per window, its user."""
    users = eligible_clients(ds)
    wins = [train_windows(ds.train_seq(int(u)), max_len, whole_history) for u in users]
    return np.repeat(users, [len(w) for w in wins]), [s for w in wins for s in w]


# evaluation of a model at a split (with targets: their exposure; with strata: by group of users), as sums over
# the users scored: in-process over the dataset (`local_evaluator`), under Flower added up from the SuperNodes'
Evaluator = Callable[[Params, str, "list[int] | None", "Callable[[int], object] | None", "Strata | None"], Sums]


def local_evaluator(ds: Dataset, scorer_of: Callable[[Params], Scorer], batch: int) -> Evaluator:
    """Evaluation over every user of `ds`, scored by `scorer_of(params)`."""
    def sums(params: Params, split: str, targets: list[int] | None = None,
             progress: Callable[[int], object] | None = None, groups: Strata | None = None) -> Sums:
        return rank_sums(ds, scorer_of(params), split, batch, targets, progress=progress, groups=groups)
    return sums


@dataclass
class EarlyStopping:
    """Validation NDCG@10 after every epoch (central) or every `eval_every` rounds (federated, `fed_patience`):
    keep a copy of the best parameters, stop after `patience` validations in a row without a better one,
    and put the best back at the end (`epochs` / `rounds` is the maximum)."""

    patience: int
    best: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    params: Params | None = None

    def stop(self, epoch: int, valid: dict[str, float], params: Params) -> bool:
        """Record this epoch's validation; True when the run should stop."""
        if valid["NDCG@10"] > self.best:
            self.best, self.best_epoch, self.stale = valid["NDCG@10"], epoch, 0
            self.params = {k: v.detach().clone() for k, v in params.items()}
        else:
            self.stale += 1
        return self.stopped

    def restore(self, params: Params, epochs_run: int, max_epochs: int, unit: str = "epoch") -> dict[str, Any]:
        """Copy the best parameters into `params` (in place: callers hold the dict); what happened, for results.json
        (`unit`: epoch or round)."""
        with torch.no_grad():
            for k, v in (self.params or {}).items():
                params[k].copy_(v)
        return {"metric": "valid NDCG@10", "patience": self.patience, f"best_{unit}": self.best_epoch,
                "best_valid_NDCG@10": self.best, f"{unit}s_run": epochs_run, f"max_{unit}s": max_epochs,
                "stopped_early": epochs_run < max_epochs}

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale,
                "params": {k: v.cpu() for k, v in (self.params or {}).items()} or None}

    def load(self, state: dict[str, Any] | None, device) -> None:
        if state:
            self.best, self.best_epoch, self.stale = state["best"], state["best_epoch"], state["stale"]
            self.params = {k: v.to(device) for k, v in state["params"].items()} if state["params"] else None

    @property
    def stopped(self) -> bool:
        return self.stale >= self.patience


@dataclass
class Run:
    """A run in progress: the global model and everything the loop logs.

    `ds` is the data where the run holds it (in-process); a server that holds none (Flower) gives
    `pop`, what its nodes told it, and an `evaluator` that adds up the nodes' evaluation sums.
    """

    cfg: Config
    ds: Dataset | None
    model: Model
    params: Params
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_seconds: float = 0.0
    train_seconds: float = 0.0
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)      # clients whose host did not answer (Flower)
    campaign: attacks.Campaign | None = None      # targets and malicious clients (fedavg)
    defence: Any = None                           # the server's defence (its state goes into model.pt)
    pop: Population | None = None                 # what the server knows of the users; read off `ds` if None
    evaluator: Evaluator | None = None            # model -> evaluation sums; over `ds` if None
    early_stopping: dict[str, Any] | None = None  # with patience / fed_patience: its best epoch / round, whether it stopped
    stopping: EarlyStopping | None = None         # federated early stopping in progress (fed_patience)

    def __post_init__(self):
        if self.pop is None:
            self.pop = hosted(self.ds)
        if self.evaluator is None:
            self.evaluator = local_evaluator(self.ds, lambda p: model_scorer(self.model, p, self.ds), self.cfg.eval_batch)

    def metrics(self, split: str, targets: list[int] | None = None,
                progress: Callable[[int], object] | None = None, groups: Strata | None = None) -> dict[str, Any]:
        """`metrics.from_sums` of the evaluator's sums for the current model (by `groups` too, when given)."""
        return from_sums(self.evaluator(self.params, split, targets, progress, groups), targets, groups=groups)

    def validate(self, bar: tqdm | None = None) -> dict[str, float]:
        t0 = time.perf_counter()
        res = self.metrics("valid", progress=_evaluating(bar, self.pop, "valid", "validating"))
        self.eval_seconds += time.perf_counter() - t0
        return res

    def exposure(self, round_: int, bar: tqdm | None = None) -> dict[str, float]:
        """ER@K of the targets over eligible test users now, recorded in the campaign's history."""
        t0 = time.perf_counter()
        res = self.metrics("test", self.campaign.targets, _evaluating(bar, self.pop, "test", "target exposure"))
        self.eval_seconds += time.perf_counter() - t0
        return self.campaign.record(round_, res)


def central_step(model: Model, params: Params, opt: torch.optim.Optimizer, batch: torch.Tensor,
                 contrast: Callable[[Params, torch.Tensor], torch.Tensor] | None = None) -> float:
    """One Adam step of full-softmax next-item cross-entropy on a batch (B, L + 1) of sequences (plus
    `contrast(params, inputs)`, CL4SRec's weighted term, when given); its loss."""
    batch = batch.to(params["item_emb"].device)
    x, y = batch[:, :-1], batch[:, 1:]
    h = model.encode(params, x, training=True)                                    # (B, L, d)
    real = y > 0
    logits = model.score(params, h[real])                                         # (P, N+1)
    loss = next_item_loss(logits, y[real])
    if contrast is not None:
        loss = loss + contrast(params, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        params["item_emb"][0] = 0.0
    return float(loss.detach())


def cl4srec_term(cfg: Config, model: Model) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    """`central_step`'s contrast for objective=cl4srec: its weighted term of a batch's inputs. The views are
    drawn from their own stream, so the batches' order stays that of plain central training."""
    views = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 4)

    def contrast(p: Params, x: torch.Tensor) -> torch.Tensor:
        u = torch.rand(x.shape[0], 2, 2 + x.shape[1], generator=views, dtype=torch.float64).to(x.device)
        return cfg.cl4srec_lambda * cl4srec_loss(model, p, x, u, cfg)
    return contrast


def train_central(run: Run, bar: tqdm | None = None) -> None:
    """Ordinary minibatch training with full-softmax cross-entropy and Adam."""
    cfg, ds, model = run.cfg, run.ds, run.model
    users, seqs = training_pairs(ds, cfg.max_len, cfg.whole_history)     # every window is an example
    for p in run.params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(run.params.values(), lr=cfg.central_lr)
    rng = np.random.default_rng(cfg.seed)
    stopping = EarlyStopping(cfg.patience) if cfg.patience else None      # what it did goes to run.early_stopping
    contrast = cl4srec_term(cfg, model) if cfg.objective == "cl4srec" else None
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(users))
        total, count = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            batch = pad_left([seqs[i] for i in order[start:start + cfg.batch_size]])  # (B, L + 1)
            loss = central_step(model, run.params, opt, batch, contrast)
            total, count = total + loss * len(batch), count + len(batch)
        seconds = time.perf_counter() - t0
        run.train_seconds += seconds
        entry = {"epoch": epoch + 1, "loss": total / max(1, count), "seconds": seconds}
        if stopping is not None or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs):
            entry["valid"] = run.validate(bar)
        run.history.append(entry)
        _progress(bar, entry)
        if stopping is not None and stopping.stop(epoch + 1, entry["valid"], run.params):
            break
    for p in run.params.values():
        p.requires_grad_(False)
    if stopping is not None:
        run.early_stopping = stopping.restore(run.params, len(run.history), cfg.epochs)


def local_clients(run: Run, r: int, users: np.ndarray) -> Collected:
    """In-process transport: every sampled client trains here, vectorised; above `hold_clients` a round, under
    FedAvg and FORTRESS, chunk by chunk as the server reads them (`defences.reads_in_passes`), else all at
    once, written once into one tensor.
    With objective=fedcl (and a weight), FedCL's exchange of representations for hard negatives comes first."""
    cfg = run.cfg
    fedcl = cfg.objective == "fedcl" and cfg.fedcl_lambda > 0      # at weight 0 FedCL is FedAvg: nothing to exchange
    hard = fedcl_exchange(cfg, run.model, run.ds, run.params, users, r) if fedcl else None
    return client_step(cfg, run.model, run.ds, run.params, users, r, stream=defences.reads_in_passes(cfg), hard=hard)


def local_attackers(run: Run, r: int, bad: np.ndarray) -> Collected:
    """In-process transport of the malicious clients: their attack runs here, on a copy of the broadcast model."""
    return malicious_step(run.cfg, run.model, run.params, run.pop.n_items, run.campaign.targets, bad, r)


def defence_log(cfg: Config, res: ServerResult, n_users: int, camp: attacks.Campaign | None) -> dict[str, Any]:
    """The round's `defence` entry: the defence's own log, the mean weight kept by benign clients, by
    short benign clients (<= SHORT interactions, as their uploads say) and by malicious ones, and
    whether each target was flagged.

    Malicious clients are the ids >= n_users (`fortress.updates.Updates`); only the log knows it.
    """
    entry = {"name": cfg.defence, **res.log.get("defence", {})}
    bad = res.clients >= n_users
    short = ~bad & (res.sizes <= SHORT)
    for key, sel in (("weight_benign", ~bad), ("weight_short", short), ("weight_malicious", bad)):
        entry[key] = float(res.weights[sel].double().mean()) if sel.any() else None
    if camp is not None and res.flagged is not None:
        entry["targets_flagged"] = [bool(t in set(res.flagged.tolist())) for t in camp.targets]
    return entry


def federated_round(run: Run, r: int, gopt: GlobalOptimizer, eligible: np.ndarray,
                    clients: Callable[[Run, int, np.ndarray], Collected] = local_clients,
                    defence=None,
                    attackers: Callable[[Run, int, np.ndarray], Collected] = local_attackers) -> dict[str, Any]:
    """One synchronous round; randomness is drawn from (seed, round) so any round is reproducible.

    `clients` carries the broadcast to the sampled benign clients and their uploads back,
    `attackers` to the sampled malicious ones: in-process here, Flower messages in
    `fortress.flower.server_app`. All uploads then meet the same server step.
    """
    cfg = run.cfg
    t0 = time.perf_counter()
    camp = run.campaign
    bad_ids = camp.malicious if camp is not None else None
    chosen = sample_clients(cfg, eligible, r, bad_ids)
    users, bad = split_sampled(chosen, bad_ids)
    got = clients(run, r, users)
    if len(bad):     # malicious clients see only a copy of the broadcast model, like benign ones
        t1 = time.perf_counter()
        fake = attackers(run, r, bad)
        got = merge(got, fake)
        camp.seconds += time.perf_counter() - t1
        camp.uploads += fake.updates.n
    res = server_step(cfg, run.params, gopt, got, len(chosen), run.pop.n_items, r, defence)
    run.rejected += [{"round": r + 1, "client": c, "reason": why} for c, why in res.rejected]
    run.dropped += [{"round": r + 1, "client": c, "reason": why} for c, why in got.dropped]
    if len(bad):
        camp.rejected += sum(1 for c, _ in res.rejected if c in set(bad.tolist()))
    info = dict(res.log)
    if cfg.defence != "none":
        info["defence"] = defence_log(cfg, res, run.pop.n_users, camp)
    seconds = time.perf_counter() - t0
    run.train_seconds += seconds
    run.bytes_down.append(got.bytes + got.down_extra)
    run.bytes_up.append(got.bytes + got.up_extra)
    return {"round": r + 1, "loss": info.pop("loss"), "seconds": seconds, **info, "malicious": int(len(bad))}


def server_state(run: Run, gopt: GlobalOptimizer, rounds_done: int, defence=None) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly (see `fortress.checkpoint`)."""
    server = {"global_opt": {k: v.cpu() for k, v in gopt.state.items()},
              "defence": defence.state_dict() if defence is not None else {}}
    return {"round": rounds_done, "config": config_mod.to_dict(run.cfg), "data": run.pop.fingerprint,
            "params": {k: v.cpu() for k, v in run.params.items()}, "server": server, "history": run.history,
            "rejected": run.rejected, "dropped": run.dropped, "bytes_up": run.bytes_up, "bytes_down": run.bytes_down,
            "train_seconds": run.train_seconds, "eval_seconds": run.eval_seconds,
            "attack": run.campaign.state() if run.campaign is not None else None,
            "early_stopping": run.stopping.state() if run.stopping is not None else None}


def restore(run: Run, gopt: GlobalOptimizer, blob: dict[str, Any], defence=None) -> int:
    """Load a checkpoint into the run; returns the number of rounds already done."""
    dev = run.params["item_emb"].device
    for k, v in blob["params"].items():
        run.params[k] = v.to(dev)
    gopt.state = {k: v.to(dev) if k != "step" else v for k, v in blob["server"]["global_opt"].items()}
    if defence is not None:
        defence.load_state_dict(blob["server"].get("defence", {}))
    run.history, run.rejected, run.dropped = blob["history"], blob["rejected"], blob.get("dropped", [])
    run.bytes_up, run.bytes_down = blob["bytes_up"], blob["bytes_down"]
    run.train_seconds, run.eval_seconds = blob["train_seconds"], blob["eval_seconds"]
    if run.campaign is not None:
        run.campaign.restore(blob.get("attack"))
    if run.stopping is not None:
        run.stopping.load(blob.get("early_stopping"), dev)
    return int(blob["round"])


def continue_monitor(cfg: Config, defence) -> None:
    """With `init_from`, a defence continues the state saved with that model when it is the same defence
    (a FORTRESS run then keeps its popularity monitor instead of starting cold)."""
    if not cfg.init_from or cfg.defence == "none":
        return
    from fortress.recommend import load_run
    saved = load_run(cfg.init_from).get("defence") or {}
    if saved.get("name") == cfg.defence and saved.get("state"):
        defence.load_state_dict(saved["state"])
        print(f"init_from: continuing the {cfg.defence} state saved with {cfg.init_from}", file=sys.stderr)


def train_federated(run: Run, bar: tqdm | None = None, out: Path | None = None, resume: bool = False,
                    clients: Callable[[Run, int, np.ndarray], Collected] = local_clients,
                    attackers: Callable[[Run, int, np.ndarray], Collected] = local_attackers) -> None:
    cfg = run.cfg
    eligible = run.pop.eligible
    if len(eligible) == 0:
        raise InputError(f"dataset {run.pop.name}: no client to train federated on (a user with at least 2 "
                         "train interactions)")
    gopt = GlobalOptimizer(cfg.global_opt, cfg.global_lr)
    defence = run.defence = defences.make(cfg, run.pop.n_items)
    continue_monitor(cfg, defence)
    stopping = run.stopping = round_stopping(cfg)
    start = 0
    if resume and out is not None:
        blob = checkpoint.load(out, cfg, run.pop.fingerprint)
        if blob is not None:
            start = restore(run, gopt, blob, defence)
            print(f"resuming from {out / checkpoint.NAME} after round {start}", file=sys.stderr)
            if bar is not None:
                bar.update(min(start, cfg.rounds))
    end = start if stopping is not None and stopping.stopped else cfg.rounds     # a resumed run that had stopped
    for r in range(start, end):
        entry = federated_round(run, r, gopt, eligible, clients, defence, attackers)
        stop = end_of_round(run, r, entry, bar)
        if out is not None and cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == cfg.rounds
                                                         or stop):
            checkpoint.save(out, server_state(run, gopt, r + 1, defence))
        if stop:
            break
    best_round(run)


def round_stopping(cfg: Config) -> EarlyStopping | None:
    """Early stopping over rounds (`fed_patience`; it needs validation every `eval_every` rounds)."""
    return EarlyStopping(cfg.fed_patience) if cfg.fed_patience and cfg.eval_every else None


def end_of_round(run: Run, r: int, entry: dict[str, Any], bar: tqdm | None) -> bool:
    """After round r (federated or PTF): validation (and exposure under attack) when the schedule asks,
    the entry into the history, the progress bar; whether early stopping ends training here."""
    cfg, stopping = run.cfg, run.stopping
    last = r + 1 == cfg.rounds
    if cfg.eval_every and (((r + 1) % cfg.eval_every == 0 and not last) or (last and stopping is not None)):
        entry["valid"] = run.validate(bar)       # with early stopping the last round is judged too
        if run.campaign is not None and not last:
            entry["ER"] = run.exposure(r + 1, bar)
    run.history.append(entry)
    _progress(bar, entry)
    return stopping is not None and "valid" in entry and stopping.stop(r + 1, entry["valid"], run.params)


def best_round(run: Run) -> None:
    """With early stopping, the final evaluation (and model.pt) is the best validated round's model."""
    if run.stopping is not None:
        run.early_stopping = run.stopping.restore(run.params, len(run.history), run.cfg.rounds, unit="round")


def ptf_round(run: Run, r: int, store: ptf.Clients, opt: torch.optim.Optimizer, eligible: np.ndarray) -> dict[str, Any]:
    """One PTF-FSR round (`fortress.ptf`): the sampled clients train and upload perturbed sequences, the
    server trains its own model on them and answers each client with its scores along a similar upload."""
    cfg, ds = run.cfg, run.ds
    t0 = time.perf_counter()
    camp = run.campaign
    bad_ids = camp.malicious if camp is not None else None
    users, bad = split_sampled(sample_clients(cfg, eligible, r, bad_ids), bad_ids)
    torch.manual_seed(cfg.seed * 1_000_003 + r)                # dropout masks of this round (clients, then server)
    dtype = DTYPES[cfg.dtype]
    seqs = [ds.train_seq(int(u))[-(cfg.max_len + 1):] for u in users]
    uploads, losses = ptf.clients_round(store, cfg, users, seqs, r, dtype)
    if len(bad):     # fake users: the same client on fake sequences
        t1 = time.perf_counter()
        fake = ptf.fake_sequences(cfg, store, bad, camp.malicious, camp.targets, r)
        up_bad, loss_bad = ptf.clients_round(store, cfg, bad, fake, r, dtype)
        uploads, losses = uploads + up_bad, {k: np.concatenate([v, loss_bad[k]]) for k, v in losses.items()}
        camp.seconds += time.perf_counter() - t1
        camp.uploads += len(bad)
    ids = np.concatenate([users, bad])
    order = np.argsort(ids, kind="stable")                    # the server reads uploads by client id
    ids, uploads = ids[order], [uploads[i] for i in order]
    rng = np.random.default_rng([cfg.seed, r, ptf.SERVER_STREAM])
    server_loss = []
    for _ in range(cfg.ptf_server_epochs):
        perm = rng.permutation(len(uploads))
        for a in range(0, len(perm), cfg.batch_size):
            batch = pad_left([uploads[i] for i in perm[a:a + cfg.batch_size]])           # (B, L + 1)
            server_loss.append(central_step(run.model, run.params, opt, batch))
    know = ptf.knowledge(run.model, run.params, pad_left(uploads), ids, cfg.ptf_kd_negatives, run.pop.n_items,
                         cfg.seed, r)
    store.knowledge.update(know)
    seconds = time.perf_counter() - t0
    run.train_seconds += seconds
    run.bytes_up.append(ptf.upload_bytes(uploads))
    run.bytes_down.append(sum(k.nbytes() for k in know.values()))
    kd = losses["kd"][np.isfinite(losses["kd"])]
    return {"round": r + 1, "loss": float(np.mean(server_loss)), "seconds": seconds, "clients": int(len(ids)),
            "client_loss": float(losses["own"].mean()), "kd_loss": float(kd.mean()) if len(kd) else float("nan"),
            "knowledge_sent": len(know), "malicious": int(len(bad))}


def train_ptf(run: Run, bar: tqdm | None = None) -> None:
    """PTF-FSR rounds (`fortress.ptf`): `run.params` is the server's own model, the one evaluated."""
    cfg = run.cfg
    eligible = run.pop.eligible
    store = ptf.Clients(ptf.client_model(cfg), run.pop.n_items)
    for p in run.params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(run.params.values(), lr=cfg.central_lr)
    run.stopping = round_stopping(cfg)
    for r in range(cfg.rounds):
        if end_of_round(run, r, ptf_round(run, r, store, opt, eligible), bar):
            break
    for p in run.params.values():
        p.requires_grad_(False)
    best_round(run)


def evaluated_users(pop: Population, split: str) -> int:
    """Users with a `split` item: those `evaluate` scores at that split."""
    return pop.n_valid if split == "valid" else pop.n_test


def _evaluating(bar: tqdm | None, pop: Population, split: str, what: str) -> Callable[[int], None] | None:
    """A `progress` for `evaluate` that shows the users scored so far at the end of the training bar."""
    if bar is None or bar.disable:
        return None
    total, done = evaluated_users(pop, split), 0

    def update(n: int) -> None:
        nonlocal done
        done += n
        bar.set_postfix_str(f"{what}: {done}/{total} users", refresh=True)
    return update


def _progress(bar: tqdm | None, entry: dict[str, Any]) -> None:
    if bar is None:
        return
    if "valid" in entry:
        bar.hr10 = entry["valid"]["HR@10"]
    post = {"loss": f"{entry['loss']:.4f}", "s/step": f"{entry['seconds']:.2f}"}
    if getattr(bar, "hr10", None) is not None:
        post["valid HR@10"] = f"{bar.hr10:.4f}"
    if "ER" in entry:
        bar.er10 = entry["ER"]["ER@10"]
    if getattr(bar, "er10", None) is not None:
        post["ER@10"] = f"{bar.er10:.4f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)


def initial_params(cfg: Config, model: Model, ds: Population | Dataset) -> Params:
    """Fresh weights for the seed, or the weights of the run named by `init_from` (same catalogue)."""
    if not cfg.init_from:
        return model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed), DTYPES[cfg.dtype])
    from fortress.recommend import load_run
    try:
        blob = load_run(cfg.init_from)
    except InputError as err:
        raise InputError(f"init_from: {err}") from None
    fresh = model.init(ds.n_items, None, DTYPES[cfg.dtype])
    saved = blob["params"] or {}
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    if shapes != {k: tuple(v.shape) for k, v in fresh.items()} or blob["item_ids"] != ds.item_ids:
        raise InputError(f"init_from={cfg.init_from!r}: that model does not fit this data and backbone "
                         f"(backbone {blob['config']['backbone']}, dim {blob['config']['dim']}, "
                         f"{len(blob['item_ids']) - 1} items; here {cfg.backbone}, dim {cfg.dim}, {ds.n_items} items)")
    return {k: v.to(DTYPES[cfg.dtype]).clone() for k, v in saved.items()}


def weights_fingerprint(params: Params) -> str:
    """The weights' sha256 (names, dtypes, shapes, values), 16 hex digits: equal for the same model on any machine,
    unlike model.pt's bytes (torch.save writes differently each time). Runs record it for the model they end with
    (`model`) and the one `init_from` gave them (`start`), so a grid can tell when its cells started from
    different copies of one pretrained model (a pretrain re-run on another CPU differs in its last bits)."""
    h = hashlib.sha256()
    for name in sorted(params):
        v = params[name].detach().cpu().contiguous()
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(path: Path, cfg: Config, ds: Dataset | None, params: Params | None, defence=None,
               pop: Population | None = None) -> None:
    """Weights + config + id maps + the users' known sequences, enough for `fortress recommend`, and the
    defence's state (so that `init_from` continues it). A server without data (`ds` None) saves the
    catalogue of `pop` and no user."""
    seqs = [ds.full_seq(u) for u in range(ds.n_users)] if ds is not None else []
    ptr = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=ptr[1:])
    counts = ds.item_counts() if ds is not None else pop.item_counts
    blob = {
        "config": config_mod.to_dict(cfg),
        "params": None if params is None else {k: v.cpu() for k, v in params.items()},
        "pop_counts": torch.as_tensor(counts if counts is not None else np.zeros(pop.n_items + 1, dtype=np.int64)),
        "user_ids": ds.user_ids if ds is not None else [], "item_ids": ds.item_ids if ds is not None else pop.item_ids,
        "user_names": ds.user_names if ds is not None else {}, "item_names": ds.item_names if ds is not None else {},
        "seq_ptr": torch.from_numpy(ptr),
        "seq_items": torch.from_numpy(np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)),
        "dataset": ds.name if ds is not None else pop.name,
        "defence": {"name": cfg.defence, "state": defence.state_dict()} if defence is not None else None,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def check_data(cfg: Config, pop: Population) -> None:
    """Refuse a dataset too small to train cfg.training on or to evaluate, naming it and what is needed."""
    s = pop.stats()
    size = f"dataset {pop.name} is too small ({s['users']} users, {s['interactions']} interactions)"
    if cfg.training != "pop" and not len(pop.eligible):
        raise InputError(f"{size}: no user has 2 train interactions; training needs users with at least 2 "
                         "(4 to be evaluated too: leave-one-out holds out the last 2)")
    if not s["users_with_test"]:
        raise InputError(f"{size}: no user has 3 interactions, so none can be evaluated "
                         "(leave-one-out holds out each user's last 2 items)")


# what a finished or interrupted run leaves in its folder, and the temporary files of their atomic writes
FINISHED = ("results.json", "model.pt")
RUN_FILES = (*FINISHED, checkpoint.NAME, "results.tmp", "model.tmp", f".{checkpoint.NAME}.*.tmp")


def check_out(out: str | Path, cfg: Config, resume: bool = False, overwrite: bool = False) -> None:
    """May `fortress run` write into `out`? A finished run there needs `overwrite`; a checkpoint there,
    `resume` or `overwrite`; `resume` needs a checkpoint. Anything else is a one-line error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; expected a folder for results.json and model.pt")
    done = [name for name in FINISHED if (out / name).exists()]
    ckpt = (out / checkpoint.NAME).exists()
    if resume:
        if cfg.training != "federated":
            raise InputError(f"--resume: training={cfg.training} writes no checkpoints; only federated runs resume")
        if not ckpt and done:
            raise InputError(f"--resume: the run in {out} is finished ({done[0]}) and has no {checkpoint.NAME} to "
                             "continue from; pass --overwrite to run it again")
        if not ckpt:
            raise InputError(f"--resume: no {checkpoint.NAME} in {out} (a run writes one every checkpoint_every "
                             "rounds); run without --resume to start")
    elif not overwrite and done:
        raise InputError(f"{out}: already holds a finished run ({done[0]}); pass --overwrite to replace it "
                         "or choose another folder")
    elif not overwrite and ckpt:
        raise InputError(f"{out}: holds an unfinished run ({checkpoint.NAME}); pass --resume to continue it "
                         "or --overwrite to start again")


def clear_out(out: str | Path) -> list[Path]:
    """Remove an earlier run's files from `out` (results, model, checkpoint, temporaries); returns them."""
    gone = [p for pattern in RUN_FILES for p in sorted(Path(out).glob(pattern)) if p.is_file()]
    for p in gone:
        p.unlink()
    return gone


def run(cfg: Config, ds: Dataset | None, out: str | Path, progress: bool = True, resume: bool = False,
        clients: Callable[[Run, int, np.ndarray], Collected] = local_clients, overwrite: bool = False,
        pop: Population | None = None, evaluator: Evaluator | None = None,
        attackers: Callable[[Run, int, np.ndarray], Collected] = local_attackers) -> dict[str, Any]:
    """Train (or count, for pop) per cfg.training, evaluate valid and test, write results and model.

    fedavg and fortress: `resume` continues from out/checkpoint.pt (written every `checkpoint_every`
    rounds) when there is one. The Flower ServerApp passes no data (`ds` None) but `pop`, what its
    SuperNodes told it, and its own transports: `clients` and `attackers` for a round's benign and
    malicious clients, `evaluator` for evaluation sums added up over the nodes. `overwrite` removes
    an earlier run's files from `out` once the inputs have been checked (`check_out` says when it is needed).
    """
    if ds is None and (pop is None or evaluator is None or cfg.training != "federated"):
        raise InputError(f"training={cfg.training}: a run without data needs federated training, the hosts' population and "
                         "an evaluator")
    config_mod.check_device(cfg)
    pop = pop if pop is not None else hosted(ds, counts=True)
    check_data(cfg, pop)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out}: cannot create the output folder ({err.strerror or type(err).__name__})") from None
    setup_torch(cfg)
    model = from_config(cfg)
    params, start = None, None
    if cfg.training == "pop":
        run_ = Run(cfg, ds, model, {}, pop=pop, evaluator=local_evaluator(ds, lambda _: pop_scorer(ds), cfg.eval_batch))
    else:
        params = {k: v.to(torch_device(cfg.device)) for k, v in initial_params(cfg, model, pop).items()}
        start = weights_fingerprint(params) if cfg.init_from else None
        counts = pop.item_counts
        if counts is None:             # the hosts send item counts only when targets are picked by popularity
            if cfg.training == "federated" and cfg.targets >= 1 and cfg.target_pick == "unpopular":
                raise InputError("target_pick=unpopular needs the item train counts, which the hosts did not send")
            counts = np.zeros(pop.n_items + 1, dtype=np.int64)
        run_ = Run(cfg, ds, model, params, campaign=attacks.campaign(cfg, counts, pop.item_ids, pop.n_users),
                   pop=pop, evaluator=evaluator)
    if overwrite:              # config, data, init_from and targets are good: only now drop the earlier run
        clear_out(out)
    steps = 0 if cfg.training == "pop" else cfg.epochs if cfg.training == "central" else cfg.rounds
    bar = tqdm(total=steps, desc=f"{cfg.training} {cfg.backbone}", unit="epoch" if cfg.training == "central" else "round",
               disable=not progress or steps == 0, dynamic_ncols=True)
    if cfg.training == "central":
        train_central(run_, bar)
    elif cfg.training == "federated":
        train_federated(run_, bar, out, resume, clients, attackers)
    elif cfg.training == "ptf":
        train_ptf(run_, bar)
    bar.close()
    # the most-popular ranking of the same test users, to compare with (needs the data: not on a Flower server)
    baseline = cfg.training != "pop" and ds is not None
    n_valid, n_test = evaluated_users(pop, "valid"), evaluated_users(pop, "test")
    ebar = tqdm(total=n_valid + n_test * (1 + baseline), desc="evaluate valid", unit="user", disable=not progress,
                dynamic_ncols=True)
    t0 = time.perf_counter()
    camp = run_.campaign
    # by history length and target popularity too, in the same pass (a server without the data has no strata)
    groups = {split: strata(ds, split) for split in ("valid", "test")} if ds is not None else {}
    valid = run_.metrics("valid", progress=ebar.update, groups=groups.get("valid"))
    ebar.set_description("evaluate test")
    test, er = attacks.split_er(run_.metrics("test", camp and camp.targets, ebar.update, groups.get("test")))
    final_eval = time.perf_counter() - t0
    popular = None
    if baseline:
        ebar.set_description("evaluate most popular")
        popular = evaluate(ds, pop_scorer(ds), "test", cfg.eval_batch, progress=ebar.update, by_strata=True)
    ebar.set_description("evaluated")
    ebar.close()
    n_steps = max(1, len(run_.history))
    results = {
        "config": config_mod.to_dict(cfg),
        "dataset": ds.stats() if ds is not None else pop.stats(),
        "history": run_.history,
        **({"early_stopping": run_.early_stopping} if run_.early_stopping else {}),
        "valid": valid,
        "test": test,
        **({"most_popular": {"test": popular}} if baseline else {}),
        "timing": {
            "seconds_per_round": run_.train_seconds / n_steps if run_.history else 0.0,
            "train_seconds": run_.train_seconds,
            "eval_seconds": run_.eval_seconds,
            "final_eval_seconds": final_eval,
            "peak_rss_mb": peak_rss_mb(),
        },
        "bytes": {
            "up_per_round": float(np.mean(run_.bytes_up)) if run_.bytes_up else 0.0,
            "down_per_round": float(np.mean(run_.bytes_down)) if run_.bytes_down else 0.0,
            "up_total": int(sum(run_.bytes_up)),
            "down_total": int(sum(run_.bytes_down)),
        },
        "rejected": run_.rejected,
        "dropped": run_.dropped,
        **({"model": weights_fingerprint(params)} if params is not None else {}),
        **({"start": start} if start else {}),
    }
    if camp is not None:
        camp.record(cfg.rounds, {**test, **er})
        results["attack"] = camp.report(cfg, pop.item_ids, er, cfg.rounds)
    write_json(out / "results.json", results)
    save_model(out / "model.pt", cfg, ds, params, run_.defence, pop)
    return results


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def summary(results: dict[str, Any]) -> str:
    """A short table of the final metrics (and the most-popular ranking's, to compare), timing and traffic."""
    cols = [f"{m}@{k}" for m in ("HR", "NDCG") for k in KS]
    rows = [("valid", results["valid"]), ("test", results["test"])]
    if "most_popular" in results:
        rows.append(("test, most popular", results["most_popular"]["test"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'split':<{width}} " + " ".join(f"{c:>8}" for c in cols)]
    for name, res in rows:
        lines.append(f"{name:<{width}} " + " ".join(f"{res[c]:>8.4f}" for c in cols))
    if "early_stopping" in results:
        e = results["early_stopping"]
        unit = "round" if "best_round" in e else "epoch"
        lines.append(f"early stopping: best valid NDCG@10 {e['best_valid_NDCG@10']:.4f} at {unit} {e[f'best_{unit}']} "
                     f"(restored); {'stopped after' if e['stopped_early'] else 'ran all'} {e[f'{unit}s_run']} of "
                     f"{e[f'max_{unit}s']} {unit}s, patience {e['patience']}")
    t, b = results["timing"], results["bytes"]
    lines.append(f"time: {t['seconds_per_round']:.3f} s/step, eval {t['final_eval_seconds']:.2f} s, "
                 f"peak RSS {t['peak_rss_mb']:.0f} MB; traffic per round: "
                 f"up {b['up_per_round'] / 1e6:.2f} MB, down {b['down_per_round'] / 1e6:.2f} MB")
    if "attack" in results:
        a = results["attack"]
        last = next((v for k, v in a.items() if k.startswith("last") and k.endswith("_mean")), {})
        lines.append(f"attack {a['attack']} ({a['malicious_clients']} malicious clients, "
                     f"{a['seconds_per_round']:.3f} s/round), targets {', '.join(a['targets'])}: test "
                     + ", ".join(f"{k} {a[k]:.4f}" for k in attacks.ER_KEYS)
                     + (f"; ER@10 mean of the last evaluations {last['ER@10']:.4f}" if last else ""))
        tails = next((v for k, v in a.items() if k.startswith("per_target_last")), {})
        if len(a.get("per_target", {})) > 1:
            each = (f"{t} {v['ER@10']:.4f}" + (f" / {tails[t]['ER@10']:.4f}" if t in tails else "")
                    for t, v in a["per_target"].items())
            lines.append("attack: ER@10 of each target (final" + (" / mean of the last evaluations" if tails else "")
                         + "): " + ", ".join(each))
        if a.get("malicious_rejected"):
            lines.append(f"attack: the server's checks rejected {a['malicious_rejected']} of {a['malicious_uploads']} "
                         f"malicious uploads (see `rejected` in results.json; max_update_norm={results['config']['max_update_norm']:g})")
    return "\n".join(lines)
