"""Run a plan's cells: resumable, in parallel, sharded over machines, within a time budget.

Every cell lives in DIR/cells/ID/: the run's own output (results.json, model.pt), log.txt, and
summary.json, written atomically (tmp file + fsync + rename) when the cell has ended: its status,
wall time, command, config, metrics, ER trajectory and versions, and no model, so the summaries
alone rebuild the report (`fortress report DIR`) and can be committed. A cell whose summary says
"ok" (and whose output exists) is finished and skipped; anything else (none, failed, killed
half-way) is cleared and run again.

Several runners may share DIR (the shards of a job array, on one machine or many over a shared
file system): a runner holds DIR/locks/ID (flock) while it runs a cell, so no cell runs twice. A
shard `i/n` runs every n-th cell of the plan, and the cells they start from when no one else has
made or is making them; it waits for those another runner is making.

Each cell is its own process (on Linux a fork of the runner, which has already imported torch, so a
cell does not pay ~1.5 s of imports; elsewhere, or where a cell may run on a GPU, a `fortress` subprocess), killed by the kernel if the
runner dies (PR_SET_PDEATHSIG), so a `kill -9` of the runner loses the cells in progress and
nothing else (their locks go with it). A failing cell is recorded with its error line and the
others go on; cells that start from it are marked failed.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import fortress
from fortress.errors import InputError
from fortress.experiments.spec import Cell, Plan, load

SUMMARY = "summary.json"
STRATA = "strata.json"          # what `fortress eval` writes into a run's folder: its metrics by stratum
SPEC_COPY = "spec.toml"
FORK = sys.platform.startswith("linux")


def forks(p: Plan) -> bool:
    """Whether cells run as forks of the runner: on Linux, unless a cell may run on a GPU (device cuda or auto; a
    fork cannot use CUDA once the runner has touched it, and checking the spec's device=cuda touches it)."""
    return FORK and not any(a in ("device=cuda", "device=auto") for c in p.cells.values() for a in c.argv)


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: a temporary file in the same folder, fsynced, then renamed over `path`
    (runners sharing DIR may write the same file at once; a reader sees the old or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))


def record(cell: Cell) -> dict[str, Any] | None:
    """The cell's summary if it has ended (ok or failed), else None."""
    try:
        return json.loads((cell.folder / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def finished(cell: Cell) -> bool:
    rec = record(cell)
    return rec is not None and rec.get("status") == "ok" and cell.made().exists()


@functools.cache
def versions() -> dict[str, str | None]:
    """What made the numbers: the versions of fortress, torch and Python, and the git commit of the fortress
    source when it runs from a checkout (with `+dirty` for uncommitted changes; None from an installed wheel)."""
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(Path(fortress.__file__).parent), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", "."):
        commit += "+dirty"
    return {"fortress": version("fortress"), "torch": version("torch"), "python": platform.python_version(),
            "commit": commit}


def summary(cell: Cell, status: str, seconds: float, error: str | None) -> dict[str, Any]:
    """What a cell leaves besides its files: enough to rebuild every table, and small enough to commit."""
    out: dict[str, Any] = {"id": cell.id, "kind": cell.kind, "status": status, "seconds": round(seconds, 2),
                           "ended": time.time(), "command": cell.command(), "labels": cell.labels, "error": error,
                           "versions": versions()}
    if status == "ok" and cell.kind != "figure":
        res = json.loads(cell.made().read_text())
        attack = res.get("attack") or {}
        here = f"{cell.root}/"                      # init_from of a pretrained cell: written DIR/..., like the command
        cfg = {k: v.replace(here, "DIR/") if isinstance(v, str) else v for k, v in res["config"].items()}
        out.update({
            "config": cfg, "dataset": {k: res["dataset"].get(k) for k in ("name", "users", "items")},
            "valid": res["valid"], "test": res["test"], "timing": res["timing"],
            "attack": {k: v for k, v in attack.items() if k != "per_target"},
            "rejected": len(res.get("rejected", [])), "dropped": len(res.get("dropped", [])),
        })
        out.update({k: res[k] for k in ("model", "start") if res.get(k)})   # weights' fingerprints (simulate)
        history = res.get("history") or []
        skipped = sum(1 for h in history if isinstance(h, dict) and h.get("skipped"))
        if skipped:                                 # rounds with too few valid uploads: the model did not move
            out["rounds_skipped"] = skipped
            out["rounds_run"] = len(history)
        if res.get("early_stopping"):               # patience / fed_patience: the best epoch or round, when it stopped
            out["early_stopping"] = res["early_stopping"]
        digest = defence_digest(history)
        if digest:
            out["defence"] = digest
    return out


def defence_digest(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What a defended run's round logs say, in a few numbers: the rounds with a defence log, those in which a
    target was flagged (None for a defence that flags no items, e.g. the median), and the mean share of their
    update kept by benign, short benign and malicious clients (over the rounds that had such clients); None for a
    run without a defence."""
    logs = [h["defence"] for h in history if isinstance(h.get("defence"), dict)
            and h["defence"].get("name") not in (None, "none")]
    if not logs:
        return None
    judged = [d["targets_flagged"] for d in logs if "targets_flagged" in d]
    out: dict[str, Any] = {"name": logs[0].get("name"), "rounds": len(logs),
                           "rounds_target_flagged": sum(map(any, judged)) if judged else None}
    for key in ("weight_benign", "weight_short", "weight_malicious"):
        xs = [d[key] for d in logs if d.get(key) is not None]
        out[key] = sum(xs) / len(xs) if xs else None
    return out


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when the runner dies (kill -9 included)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    if os.getppid() != parent:                                          # it died before prctl
        os._exit(1)


class Job:
    """A cell running in its own process: a fork of the runner calling `main(argv)` (Linux), or a
    `fortress` subprocess."""

    def __init__(self, cell: Cell, main: Callable[[list[str]], int], close_fds: tuple[int, ...] = (),
                 fork: bool = FORK):
        argv = [*cell.argv, "--quiet"] if cell.kind != "figure" else cell.argv
        log = cell.folder / "log.txt"
        self.cell, self.t0, self.proc, self.pid = cell, time.time(), None, 0
        if not fork:
            with open(log, "w") as f:
                self.proc = subprocess.Popen([sys.executable, "-m", "fortress.cli", *argv], stdout=f,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            return
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self.pid = pid
            return
        code = 1
        try:                                   # the child: never returns into the runner
            for fd in close_fds:
                os.close(fd)                   # the runner's locks stay with the runner
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C: the runner kills its cells
            die_with_parent(parent)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = main(argv)
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:  # noqa: BLE001 - anything a cell raises ends up in its log
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait()
            else:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def error_line(log: Path, code: int) -> str:
    """The line that says why a cell failed: its `error:` line, else the last line of the log."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    why = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
    code_txt = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    return f"{code_txt}: {why[:300]}" if why else code_txt


def prepare(root: Path) -> None:
    """Create DIR (and DIR/locks); a file in its place is a one-line error."""
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root}: is a file; expected a folder for the cells and report.md")
    try:
        (root / "locks").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {root}: cannot create the folder ({err.strerror or type(err).__name__})") from None


def claim(cell: Cell) -> int | None:
    """Hold DIR/locks/ID for this runner (the lock goes when the fd is closed or the runner dies);
    None if another runner holds it."""
    fd = os.open(cell.root / "locks" / cell.id, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as err:          # e.g. NFS without a lock service: shards could run a cell twice
        os.close(fd)
        raise InputError(f"{cell.root}: file locks do not work in this folder ({err.strerror or err}); "
                         "put --out on a file system with working locks (a local disk, NFS v4)") from None
    return fd


def shard(p: Plan, i: int = 1, n: int = 1) -> list[str]:
    """The cells shard i of n is for: every n-th cell of the plan from the i-th (1-based), and the
    cells they start from; in run order. The same spec gives the same shards on every machine."""
    mine = {cid for k, cid in enumerate(p.cells) if k % n == i - 1}
    stack = list(mine)
    while stack:
        for a in p.cells[stack.pop()].after:
            if a not in mine:
                mine.add(a)
                stack.append(a)
    return [cid for cid in p.cells if cid in mine]


def save_spec(p: Plan, log: Callable[[str], None] | None = None) -> None:
    """Keep the spec in DIR/spec.toml, so `fortress report DIR` needs nothing but the folder. A slice of a larger
    spec (some of its methods, seeds or attacks, run into the same DIR) leaves the larger one in place: when the
    spec already there holds every cell of this one, it stays, and the report still covers the whole grid."""
    path = p.root / SPEC_COPY
    if p.text is None or (path.exists() and path.read_text() == p.text):
        return
    if path.exists():
        try:
            there = load(path, p.root, check_data=False)
        except InputError:
            there = None
        if there is not None and set(p.cells) <= set(there.cells):
            if log:
                log(f"kept {path}: it holds all {len(p.cells)} cells of {p.spec} (and {len(there.cells) - len(p.cells)} more)")
            return
    write_text(path, p.text)


def execute(p: Plan, main: Callable[[list[str]], int], jobs: int = 1, part: tuple[int, int] = (1, 1),
            budget: float | None = None, progress: bool = True, log=None) -> dict[str, int]:
    """Run the unfinished cells of shard `part` (and what they start from), up to `jobs` at once,
    starting none after `budget` seconds; returns counts of ok / failed / waiting (not started) cells.

    `main(argv)` runs one `fortress` command (the CLI's main). On Linux cells are forks of this
    process: call it from a process that has not run torch operations yet (like the `fortress
    experiment` command), since torch's thread pools do not survive a fork.
    """
    from tqdm import tqdm
    fork = forks(p)
    if fork:       # import torch and the simulator once here; forked cells inherit them (no torch op has run)
        import fortress.simulate  # noqa: F401
    log = log or (lambda msg: print(msg, file=sys.stderr))
    prepare(p.root)
    save_spec(p, log)
    versions()     # the commit now, as the cells run the code imported now: the checkout may move while they run
    t0, start = time.monotonic(), time.time()
    todo = [p.cells[cid] for cid in shard(p, *part)]
    done = {c.id for c in todo if finished(c)}
    todo = [c for c in todo if c.id not in done]
    kinds = {k: sum(c.kind == k for c in p.cells.values()) for k in ("pretrain", "run", "figure")}
    where = f"shard {part[0]}/{part[1]}: " if part[1] > 1 else ""
    log(f"{len(p.cells)} cells ({kinds['pretrain']} pretrain, {kinds['run']} runs, {kinds['figure']} figures); "
        f"{where}{len(done)} finished earlier, {len(todo)} to run, {jobs} at a time"
        + (f", none started after {budget:g} s" if budget is not None else ""))
    counts = {"ok": len(done), "failed": 0, "waiting": 0}
    failed: set[str] = set()
    running: dict[str, tuple[Job, int]] = {}          # cell id -> (job, its lock)
    tqdm.monitor_interval = 0          # no monitor thread: the runner forks, so it stays single-threaded
    bar = tqdm(total=len(done) + len(todo), initial=len(done), unit="cell", disable=not progress, dynamic_ncols=True)

    def end(cell: Cell, status: str, seconds: float, error: str | None = None) -> None:
        cell.folder.mkdir(parents=True, exist_ok=True)
        write_json(cell.folder / SUMMARY, summary(cell, status, seconds, error))
        counts[status] += 1
        (done if status == "ok" else failed).add(cell.id)
        if status != "ok":
            bar.write(f"{status} {cell.id} ({cell.labels[0]}): {error}")
        bar.set_postfix(running=len(running), failed=counts["failed"], refresh=False)
        bar.update(1)

    def ready(cell: Cell) -> bool:
        """Whether to take the cell now; settles it instead when it is done or cannot run."""
        if any(a in failed for a in cell.after):
            todo.remove(cell)
            end(cell, "failed", 0.0, f"not run: {next(a for a in cell.after if a in failed)} failed")
            return False
        if not all(a in done for a in cell.after):
            return False
        rec = record(cell)
        if rec and rec.get("status") == "ok" and cell.made().exists():        # another runner made it
            todo.remove(cell)
            done.add(cell.id)
            counts["ok"] += 1
            bar.update(1)
            return False
        if rec and rec.get("status") == "failed" and rec.get("ended", 0) >= start:   # ... or tried it just now
            todo.remove(cell)
            failed.add(cell.id)
            counts["failed"] += 1
            bar.update(1)
            return False
        return True

    try:
        while todo or running:
            over = budget is not None and time.monotonic() - t0 >= budget
            if over and not running:
                break
            for cell in list(todo):
                if over or len(running) >= jobs:
                    break
                if not ready(cell):
                    continue
                lock = claim(cell)
                if lock is None:                            # another runner is making it
                    continue
                if not ready(cell):                         # it finished between the look and the lock
                    os.close(lock)
                    continue
                todo.remove(cell)
                if cell.folder.exists():            # what a killed or failed attempt left: cleared
                    shutil.rmtree(cell.folder)          # here, so the cell's run needs no --overwrite
                cell.folder.mkdir(parents=True)
                if cell.kind == "figure":
                    cell.out.unlink(missing_ok=True)    # an older PNG must not pass for this one
                cell.out.parent.mkdir(parents=True, exist_ok=True)
                locks = tuple(fd for _, fd in running.values()) + (lock,)
                running[cell.id] = (Job(cell, main, locks, fork), lock)
                bar.set_postfix(running=len(running), failed=counts["failed"], refresh=True)
            ended = [(cid, j, c) for cid, (j, _) in running.items() if (c := j.poll()) is not None]
            for cid, job, code in ended:
                ok = code == 0 and job.cell.made().exists()
                end(job.cell, "ok" if ok else "failed", time.time() - job.t0,
                    None if ok else error_line(job.cell.folder / "log.txt", code))
                os.close(running.pop(cid)[1])
            if not ended:
                time.sleep(0.1 if running else 0.5)
    finally:
        for job, lock in running.values():      # Ctrl-C or an error in the runner: stop the cells, record nothing
            job.kill()
            os.close(lock)
        bar.close()
    counts["waiting"] = len(todo)
    return counts
