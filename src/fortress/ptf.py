"""PTF-FSR, parameter-transmission-free federated sequential recommendation (`training=ptf`): clients and
server share predictions, never model parameters.

Yuan, Yang, Qu, Nguyen, Ye and Yin, "PTF-FSR: A Parameter Transmission-Free Federated Sequential
Recommender System", ACM TOIS 2025 (arXiv 2406.05387); the authors' code: github.com/hi-weiyuan/PTF-FSR.
Each client keeps its own small model (`ptf_client_backbone`, `ptf_client_dim`) and the server its own
(`backbone`, `dim`, ...: the model that is evaluated). A round (`simulate.ptf_round` drives it):

1. Clients. Each sampled client trains its model for `local_epochs` Adam steps (`ptf_client_lr`, fresh
   state each round) on its own last max_len + 1 items and on the knowledge the server sent it last
   time, then perturbs its sequence with it: every input item but the first is, with probability
   `ptf_replace`, replaced by an item drawn from the model's prediction for that position,
   softmax(`ptf_epsilon` x logits) over the items the client knows. Of `ptf_candidates` such
   sequences it uploads the one after which its model scores its true last item highest, followed by
   that true last item (`perturb`).
2. Server. It trains its model on the round's uploads (`ptf_server_epochs` passes in mini-batches of
   `batch_size`, full-softmax cross-entropy, Adam at `central_lr`, its state kept across rounds).
3. Knowledge. For each client of the round the server takes the upload most similar to the client's
   own (cosine of the server's representations after the last input) and sends it back with its
   scores, at every position, of the next item and of `ptf_kd_negatives` random items. The client
   distils them at its next round: cross-entropy against the server's softmax over those items
   (`distil_loss`).

What is shared per round, counted as FedAvg's bytes are (what crosses the wire; ids int32, scores
in the model's float type): up, each client's perturbed sequence, n + 1 ids for n inputs; down, the
knowledge, n' + 1 ids of the similar sequence, n' x k negative ids and n' x (1 + k) scores. No
parameter leaves a client or the server, and neither side holds the other's model.

The paper's own text beyond its abstract could not be read here; the protocol follows the authors'
code. What that leaves open, or where we differ from it, and the choice made:
- Which model is evaluated: the server's, ranking every item from the user's true history with the
  evaluation every other method gets (`metrics`). The code queries the server with the client's last
  (perturbed) upload instead; ours measures the server model, not the perturbation's cost at query time.
- The client's item table holds the items it knows: its own, `n_neg` random ones drawn at its first
  round, and every item of the knowledge it has received (in the code a full table, of which only
  these rows are ever trained; it draws replacements from the same set). Its model persists across
  rounds; its optimiser does not (the code keeps Adam's state).
- The client's loss: softmax cross-entropy over the items it knows plus the distillation term, one
  step per epoch (the code: binary cross-entropy with one negative per position, and a second step
  on the knowledge whose targets are the server's raw scores, which lie outside [0, 1]).
- An input item is replaced by a draw from the prediction made at the position before it, i.e. for
  that item (the code draws from the prediction made at the item's own position, which is for the
  next one); the first input is never replaced, as in the code.
- The server trains with the full softmax over the catalogue (the code: binary cross-entropy against
  negatives the client uploads, drawn from items the client knows, which would tell the server
  more about it). Knowledge negatives are uniform over the catalogue; a repeat of the target is
  not excluded. The code's two contrastive terms on the server (`pc_cl`, `is_cl`) are left out.
- Clients: `clients_per_round` sampled per round (the code visits every client once per epoch in
  batches of 256); a client keeps the knowledge of its round for its next one.
- Attacks: only data poisoning applies (`ATTACKS`): fake users run this very client on fake
  sequences, an item list then a target, drawn every round like the federated `random` and `popular`
  attacks. No model is broadcast to probe for popular items, so `popular` draws from the items most
  frequent in the knowledge its fake users received (other users' uploads), random ones until it
  has enough. Attacks that upload model updates have nothing to upload here; config refuses them.
- No checkpoints (the clients' models would have to be saved with the server's).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import vmap

from fortress.attacks.base import append_targets, random_items
from fortress.attacks.baselines import POOL_PER_ITEM
from fortress.client import length_buckets, local_train, rec_loss, sample_negatives
from fortress.models import Model, Params

ATTACKS = ("random", "popular")          # the attacks that fit a protocol without model uploads
# random streams (seed, round?, stream, client): a client draws the same wherever and however it is batched
INIT_STREAM, ROWS_STREAM, DRAW_STREAM, KD_STREAM, FAKE_STREAM, SERVER_STREAM = 21, 22, 23, 24, 25, 26
ID_BYTES = 4                             # an item id on the wire (int32)


def client_model(cfg) -> Model:
    """A client's own model (one attention head, as in the authors' code)."""
    return Model(cfg.ptf_client_backbone, cfg.ptf_client_dim, cfg.max_len, cfg.blocks, 1, cfg.dropout)


@dataclass
class ClientState:
    """What one client keeps between rounds: its model over the items it knows."""

    items: np.ndarray        # (S,) global ids of table rows 1..S (row 0 is padding)
    table: torch.Tensor      # (S + 1, d)
    dense: dict[str, torch.Tensor]


@dataclass
class Knowledge:
    """The server's answer to a client: a similar user's upload and its own scores along it."""

    x: np.ndarray            # (n,) the upload's inputs (global ids)
    items: np.ndarray        # (n, 1 + k) at each position its next item, then k random items
    scores: torch.Tensor     # (n, 1 + k) the server's logits of those items after that position

    def nbytes(self) -> int:
        n, k1 = self.items.shape
        return ID_BYTES * (n + 1 + n * (k1 - 1)) + self.scores.numel() * self.scores.element_size()


@dataclass
class Clients:
    """Every client's state and the knowledge each holds, kept by the simulation (on the clients in a deployment)."""

    model: Model
    n_items: int
    states: dict[int, ClientState] = field(default_factory=dict)
    knowledge: dict[int, Knowledge] = field(default_factory=dict)


def _slots(items: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Table slots (1-based) of global `ids` in a client's `items`; 0 stays 0."""
    order = np.argsort(items, kind="stable")
    out = order[np.searchsorted(items, ids, sorter=order).clip(max=len(items) - 1)] + 1
    return np.where(ids > 0, out, 0)


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng(list(key)).integers(2 ** 62)))


def prepare(store: Clients, cfg, client: int, seq: np.ndarray, r: int, dtype: torch.dtype) -> ClientState:
    """The client's state at the start of round r: created at its first round, its table grown by the items
    of its sequence and of the knowledge it holds that it did not know yet (fresh rows, N(0, 0.02))."""
    st = store.states.get(client)
    if st is None:
        own = np.unique(seq)
        neg = sample_negatives(own, store.n_items, min(cfg.n_neg, store.n_items - len(own)),
                         np.random.default_rng([cfg.seed, INIT_STREAM, client]))
        items = np.concatenate([own, neg])
        p = store.model.init(len(items), _generator(cfg.seed, INIT_STREAM, client), dtype)
        st = store.states[client] = ClientState(items, p.pop("item_emb"), p)
    know = store.knowledge.get(client)
    wanted = [seq] if know is None else [seq, know.x, know.items.ravel()]
    new = np.setdiff1d(np.concatenate(wanted), st.items)
    new = new[new > 0]
    if len(new):
        rows = torch.randn(len(new), st.table.shape[1], generator=_generator(cfg.seed, r, ROWS_STREAM, client),
                           dtype=dtype) * 0.02
        st.items, st.table = np.concatenate([st.items, new]), torch.cat([st.table, rows])
    return st


def distil_loss(model: Model, dense: Params, table: torch.Tensor, x: torch.Tensor, items: torch.Tensor,
                scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the client's softmax over each position's sent items against the server's:
    x (L,) slots of the similar sequence, items (L, 1 + k) slots, scores (L, 1 + k) the server's logits."""
    h = model.encode({**dense, "item_emb": table}, x[None], training=True)[0]   # (L, d)
    student = (h[:, None, :] * table[items]).sum(-1).log_softmax(-1)          # (L, 1 + k)
    ce = -(scores.softmax(-1) * student).sum(-1)                                # (L,)
    real = items[:, 0] > 0
    return torch.where(real, ce, torch.zeros_like(ce)).sum() / real.sum().clamp(min=1)


def ptf_loss(model: Model, dense: Params, table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             col_mask: torch.Tensor, draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A client's loss (client.local_train's signature): next-item softmax over its known items plus the
    distillation of its knowledge (`draws`: kx, kitems, kscores; all-0 slots when it holds none)."""
    own = rec_loss(model, dense, table, x, y, col_mask)
    kd = distil_loss(model, dense, table, draws["kx"], draws["kitems"], draws["kscores"])
    return own + kd, {"own": own.detach(), "kd": kd.detach()}


def perturb(model: Model, epsilon: float, replace: float, dense: Params, table: torch.Tensor, x: torch.Tensor,
            y: torch.Tensor, col_mask: torch.Tensor, u_swap: torch.Tensor, u_pick: torch.Tensor) -> torch.Tensor:
    """The inputs the client uploads, (L,) slots: candidates with items replaced by draws from its predictions,
    the one after which its model scores the true last item y[-1] highest.

    u_swap (L,) in [0, 1): an input is replaced where u_swap < `replace`; u_pick (C, L) in (0, 1]: the
    inverse-CDF draw of each candidate's replacement of each input."""
    p = {**dense, "item_emb": table}
    S = table.shape[0]
    h = model.encode(p, x[None])[0]                                             # (L, d)
    known = col_mask & (torch.arange(S, device=x.device) > 0)                   # (S,)
    prob = (epsilon * (h @ table.T)).masked_fill(~known, float("-inf")).softmax(-1)   # (L, S)
    before = torch.cat([prob[:1], prob[:-1]])            # (L, S): the prediction made before each input (row 0 unused)
    cdf = before.cumsum(-1)                                                     # (L, S)
    # each input's draw: the first slot whose cdf reaches u (slot 0, padding, has cdf 0)
    drawn = (cdf[None] < u_pick[..., None] * cdf[None, :, -1:]).sum(-1)         # (C, L)
    real = x > 0
    after_real = torch.cat([torch.zeros_like(real[:1]), real[:-1]])          # the first real input has none
    swap = (u_swap < replace) & real & after_real                               # (L,)
    cand = torch.where(swap, drawn, x)                                          # (C, L)
    hc = model.encode(p, cand)[:, -1]                                           # (C, d)
    best = (hc @ table[y[-1]]).argmax()
    return cand.gather(0, best.reshape(1, 1).expand(1, cand.shape[1]))[0]        # (L,)


def client_step(model: Model, cfg, dense: Params, table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                col_mask: torch.Tensor, draws: dict[str, torch.Tensor], u_swap: torch.Tensor, u_pick: torch.Tensor
                ) -> tuple[Params, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One client's round, pure: train, then perturb. Its new encoder and table, its upload's input slots (L,),
    and its losses."""
    epochs = cfg.local_epochs
    rep = {k: v.expand(epochs, *v.shape) for k, v in draws.items()}            # the same knowledge every epoch
    d_dense, d_table, _, terms = local_train(model, ptf_loss, epochs, cfg.ptf_client_lr, "adam", dense, table,
                                             x, y, col_mask, rep)
    dense = {k: dense[k] + d_dense[k] for k in dense}
    table = table + d_table
    with torch.no_grad():
        up = perturb(model, cfg.ptf_epsilon, cfg.ptf_replace, dense, table, x, y, col_mask, u_swap, u_pick)
    return dense, table, up, terms


@dataclass
class Batch:
    """Clients stepped together; tensors left-padded to the longest sequence and table of the batch."""

    ids: np.ndarray
    dense: dict[str, torch.Tensor]    # {k: (n, ...)}
    table: torch.Tensor               # (n, S, d)
    col_mask: torch.Tensor            # (n, S)
    x: torch.Tensor                   # (n, L) own inputs, slots
    y: torch.Tensor                   # (n, L)
    draws: dict[str, torch.Tensor]    # kx (n, K), kitems (n, K, 1 + k), kscores (n, K, 1 + k)
    u_swap: torch.Tensor              # (n, L)
    u_pick: torch.Tensor              # (n, C, L)
    sizes: list[int]                  # each client's table rows (+ padding row)
    lengths: list[int]                # each client's inputs
    know_lengths: list[int]           # each client's knowledge positions (0: none)


def _right(rows: list[np.ndarray], width: int, dtype=np.int64) -> np.ndarray:
    """Rows right-aligned in a (n, width, ...) zero array."""
    out = np.zeros((len(rows), width, *rows[0].shape[1:]), dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row):] = row
    return out


def make_batch(store: Clients, cfg, ids: np.ndarray, seqs: list[np.ndarray], r: int, dtype: torch.dtype) -> Batch:
    """The clients' states, own sequences, knowledge and random draws as one padded batch."""
    k1, C = cfg.ptf_kd_negatives + 1, cfg.ptf_candidates
    states = [store.states[int(c)] for c in ids]
    know = [store.knowledge.get(int(c)) for c in ids]
    sizes = [len(st.items) + 1 for st in states]
    S, L = max(sizes), max(len(s) - 1 for s in seqs)
    K = max([1] + [len(k.x) for k in know if k is not None])
    table = torch.zeros(len(ids), S, states[0].table.shape[1], dtype=dtype)
    for i, st in enumerate(states):
        table[i, :sizes[i]] = st.table
    local = [_slots(st.items, s) for st, s in zip(states, seqs)]
    kx, kitems, kscores = [], [], []
    for st, kn in zip(states, know):
        if kn is None:
            kx.append(np.zeros(0, dtype=np.int64))
            kitems.append(np.zeros((0, k1), dtype=np.int64))
            kscores.append(np.zeros((0, k1)))
        else:
            kx.append(_slots(st.items, kn.x))
            kitems.append(_slots(st.items, kn.items.ravel()).reshape(kn.items.shape))
            kscores.append(kn.scores.numpy())
    swaps, picks = [], []
    for c, s in zip(ids, seqs):
        rng = np.random.default_rng([cfg.seed, r, DRAW_STREAM, int(c)])
        swaps.append(rng.random(len(s) - 1))
        picks.append((1.0 - rng.random((C, len(s) - 1))).T)                    # (n, C): (0, 1]
    return Batch(
        np.asarray(ids), {k: torch.stack([st.dense[k] for st in states]) for k in states[0].dense}, table,
        torch.arange(S)[None] < torch.as_tensor(sizes)[:, None],
        torch.from_numpy(_right([s[:-1] for s in local], L)), torch.from_numpy(_right([s[1:] for s in local], L)),
        {"kx": torch.from_numpy(_right(kx, K)), "kitems": torch.from_numpy(_right(kitems, K)),
         "kscores": torch.from_numpy(_right(kscores, K, np.float64)).to(dtype)},
        torch.from_numpy(_right(swaps, L, np.float64)).to(dtype),
        torch.from_numpy(_right(picks, L, np.float64)).to(dtype).transpose(1, 2).contiguous(),
        sizes, [len(s) - 1 for s in seqs], [len(k) for k in kx])


def step_batch(model: Model, cfg, b: Batch, engine: str = "vmap"
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`client_step` of every client of the batch, vectorised (`vmap`) or one by one on its own unpadded
    tensors (`loop`, the reference): new encoders {k: (n, ...)}, tables (n, S, d), uploads (n, L), losses."""
    fn = partial(client_step, model, cfg)
    if engine == "vmap":
        return vmap(fn, randomness="different")(b.dense, b.table, b.x, b.y, b.col_mask, b.draws, b.u_swap, b.u_pick)
    outs = []
    for i in range(len(b.ids)):
        S, L, K = b.sizes[i], b.lengths[i], max(1, b.know_lengths[i])
        draws = {k: v[i, -K:] for k, v in b.draws.items()}
        outs.append(fn({k: v[i] for k, v in b.dense.items()}, b.table[i, :S], b.x[i, -L:], b.y[i, -L:],
                       b.col_mask[i, :S], draws, b.u_swap[i, -L:], b.u_pick[i, :, -L:]))
    table = torch.zeros_like(b.table)
    up = torch.zeros_like(b.x)
    for i, o in enumerate(outs):
        table[i, :o[1].shape[0]] = o[1]
        up[i, up.shape[1] - len(o[2]):] = o[2]
    dense = {k: torch.stack([o[0][k] for o in outs]) for k in b.dense}
    terms = {k: torch.stack([o[3][k] for o in outs]) for k in outs[0][3]}
    return dense, table, up, terms


def clients_round(store: Clients, cfg, ids: np.ndarray, seqs: list[np.ndarray], r: int,
                  dtype: torch.dtype = torch.float32) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Round r of the clients `ids` with own sequences `seqs` (their last max_len + 1 items): their uploads
    (global ids, the perturbed inputs then the true last item), in `ids` order, and their losses."""
    for c, s in zip(ids, seqs):
        prepare(store, cfg, int(c), s, r, dtype)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    uploads: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(ids)
    losses = {"own": np.zeros(len(ids)), "kd": np.full(len(ids), np.nan)}
    for part in length_buckets(np.array([len(seqs[i]) - 1 for i in order]), cfg.chunk_size):
        idx = order[part]
        b = make_batch(store, cfg, ids[idx], [seqs[i] for i in idx], r, dtype)
        dense, table, up, terms = step_batch(store.model, cfg, b, cfg.engine)
        for row, i in enumerate(idx):
            st = store.states[int(ids[i])]
            st.dense = {k: v[row].clone() for k, v in dense.items()}
            st.table = table[row, :b.sizes[row]].clone()
            got = st.items[up[row, up.shape[1] - b.lengths[row]:].numpy() - 1]
            uploads[i] = np.append(got, seqs[i][-1])
            losses["own"][i] = float(terms["own"][row])
            if b.know_lengths[row]:
                losses["kd"][i] = float(terms["kd"][row])
    return uploads, losses


@torch.no_grad()
def knowledge(model: Model, params: Params, batch: torch.Tensor, ids: np.ndarray, k: int, n_items: int, seed: int,
              r: int) -> dict[int, Knowledge]:
    """The server's answer to each client of the round: the most similar other upload (cosine of the server's
    representation after the last input) with the server's scores of each position's next item and of k
    random items. batch (n, L + 1): the uploads in `ids` order, left-padded."""
    if len(ids) < 2:
        return {}
    x, y = batch[:, :-1], batch[:, 1:]                                         # (n, L)
    h = model.encode(params, x.to(params["item_emb"].device))                  # (n, L, d)
    rep = F.normalize(h[:, -1], dim=-1)                                         # (n, d)
    sim = rep @ rep.T
    sim.fill_diagonal_(float("-inf"))
    partner = sim.argmax(1).cpu()
    out = {}
    for i, c in enumerate(ids.tolist()):
        j = int(partner[i])
        real = x[j] > 0
        neg = np.random.default_rng([seed, r, KD_STREAM, c]).integers(1, n_items + 1, size=(int(real.sum()), k))
        items = torch.cat([y[j][real][:, None], torch.from_numpy(neg)], dim=1)   # (n', 1 + k)
        emb = params["item_emb"][items.to(params["item_emb"].device)]             # (n', 1 + k, d)
        scores = (h[j][real.to(h.device)][:, None, :] * emb).sum(-1)             # (n', 1 + k)
        out[c] = Knowledge(x[j][real].numpy(), items.numpy(), scores.cpu())
    return out


def popular_pool(store: Clients, malicious: np.ndarray, size: int) -> np.ndarray | None:
    """The items most frequent in the knowledge the fake users hold (other users' uploads), at most `size`."""
    counts: Counter = Counter()
    for c in malicious.tolist():
        kn = store.knowledge.get(c)
        if kn is not None:
            counts.update(kn.x.tolist())
            counts.update(kn.items[:, 0].tolist())
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    return np.asarray(ranked[:size], dtype=np.int64) if ranked else None


def fake_sequences(cfg, store: Clients, ids: np.ndarray, malicious: np.ndarray, targets: list[int],
                   r: int) -> list[np.ndarray]:
    """This round's sequences of the fake users `ids`: attack_len - 1 items then a target (`cfg.attack`)."""
    rng = np.random.default_rng([cfg.seed, r, FAKE_STREAM])
    t = torch.as_tensor(targets, dtype=torch.int64)
    pool = None
    if cfg.attack == "popular":
        pool = popular_pool(store, malicious, POOL_PER_ITEM * cfg.attack_len)
        if pool is not None and len(np.setdiff1d(pool, targets)) < cfg.attack_len - 1:
            pool = None                                  # too few items seen yet: random ones
    return append_targets(random_items(rng, len(ids), cfg.attack_len - 1, store.n_items, t, pool), t)


def upload_bytes(uploads: list[np.ndarray]) -> int:
    return ID_BYTES * sum(len(u) for u in uploads)
