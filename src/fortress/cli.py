"""`fortress` command line: run, experiment, report, data stats, recommend, eval, plot."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from fortress.errors import InputError, printable


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _at_least(low: int):
    """An argparse type: an integer >= low (a bad one is argparse's one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range; it must be >= {low}")
        return value
    return parse


def _fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:              # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text} is out of range; it must be in (0, 1)")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from fortress import config, simulate
    from fortress.data import load_data
    from fortress.population import hosted
    sets = list(args.set or [])
    if args.format:
        sets.append(f"data_format={args.format}")
    cfg = config.load(args.config, sets)
    config.check_device(cfg)
    simulate.check_out(args.out, cfg, args.resume, args.overwrite)     # before the data load, which can be slow
    ds = load_data(args.data, cfg)
    simulate.check_data(cfg, hosted(ds))
    if not args.quiet:
        print(f"data: {ds.name}: {ds.n_users} users, {ds.n_items} items, "
              f"{int(ds.stats()['interactions'])} interactions", file=sys.stderr)
    results = simulate.run(cfg, ds, args.out, progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)
    print(simulate.summary(results))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'model.pt'}")
    return 0


def missing(module: str) -> bool:
    """Whether `module` cannot be imported (without importing it; None in sys.modules counts as missing)."""
    import importlib.util
    if module in sys.modules:
        return sys.modules[module] is None
    return importlib.util.find_spec(module) is None


def check_plot_extra(plan) -> None:
    """A spec whose report draws figures needs matplotlib: say so before any cell runs, not after."""
    if (plan.figures or any(e.section == "sensitivity" for e in plan.entries)) and missing("matplotlib"):
        raise InputError(f"{plan.spec}: its report draws figures ([sensitivity] or [[figures]]) and needs "
                         "matplotlib, which is not installed: pip install 'fortress[plot]'")


def check_figure_commands(plan) -> None:
    """Every [[figures]] command is a `fortress` command of this version: checked before any cell runs."""
    top = build_parser()
    for cell in plan.cells.values():
        parser = top
        for word in cell.need:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not subs or word not in subs[0].choices:
                raise InputError(f"{plan.spec}: {cell.labels[0]}: `fortress {' '.join(cell.need)}` is not a command")
            parser = subs[0].choices[word]


def _shard(text: str) -> tuple[int, int]:
    """An argparse type: `i/n` with 1 <= i <= n (a SLURM array: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)."""
    i, sep, n = text.partition("/")
    try:
        part = (int(i), int(n))
    except ValueError:
        part = (0, 0)
    if not sep or not 1 <= part[0] <= part[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n with 1 <= i <= n, e.g. 1/4")
    return part


def _duration(text: str) -> float:
    """An argparse type: seconds from `90`, `90s`, `45m`, `2h`, `1.5d` or `1h30m`."""
    import re
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not parts or "".join(a + b for a, b in parts) != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration such as 2h, 45m, 1h30m or 600 (seconds)")
    return sum(float(a) * units[b] for a, b in parts)


def cmd_experiment(args: argparse.Namespace) -> int:
    from fortress.experiments import report, runner, spec
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: must be >= 1")
    plan = spec.load(args.spec, args.out)                 # the whole spec is checked before anything runs
    check_plot_extra(plan)                                 # ... and what its report needs is installed
    check_figure_commands(plan)
    if args.dry_run:
        mine = runner.shard(plan, *args.shard)
        done = 0
        for cid in mine:
            cell = plan.cells[cid]
            done += runner.finished(cell)
            print(f"{cell.id}  {'finished' if runner.finished(cell) else 'to run':<8}  {cell.labels[0]}\n"
                  f"    {cell.command()}")
        kinds = [plan.cells[cid].kind for cid in mine]
        print(f"{len(kinds)} cells ({kinds.count('pretrain')} pretrain, {kinds.count('run')} runs, "
              f"{kinds.count('figure')} figures): {done} finished, {len(kinds) - done} to run"
              + (f" (shard {args.shard[0]}/{args.shard[1]} of {len(plan.cells)} cells)" if args.shard[1] > 1 else ""))
        return 0
    counts = runner.execute(plan, main, args.jobs, args.shard, args.budget, progress=not args.quiet)
    path = report.write(plan)
    waiting = f", {counts['waiting']} not started (--budget)" if counts["waiting"] else ""
    print(f"wrote {path} ({counts['ok']} cells ok, {counts['failed']} failed{waiting})")
    return 1 if counts["failed"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from fortress.experiments import report
    plan = report.rebuild(Path(args.dir))
    check_plot_extra(plan)
    written = [(report.write(plan), plan)]
    if args.publish:                    # DEST may hold cells from other machines: its own count
        published = report.publish(plan, Path(args.publish))
        written.append((report.write(published), published))
    for path, p in written:
        missing_cells = sum(report.record(c) is None for c in p.cells.values())
        print(f"wrote {path}" + (f" ({missing_cells} of {len(p.cells)} cells missing)" if missing_cells else ""))
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from fortress.config import Config
    from fortress.data import describe, load_data
    ds = load_data(args.path, Config(data_format=args.format, kcore=args.kcore))      # synthetic: the defaults
    print(describe(ds, detected=args.format == "auto" and args.path != "synthetic"))
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from fortress.recommend import recommend
    for line in recommend(args.run_dir, args.user, args.k):
        print(line)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fortress import evaluate_run
    splits = ("valid", "test") if args.split == "both" else (args.split,)
    result = evaluate_run.evaluate_run(args.run_dir, splits, args.data, args.threads)
    path = evaluate_run.write(result, args.out or Path(args.run_dir) / evaluate_run.OUT_NAME)
    for split in splits:
        for line in evaluate_run.table(result, split):
            print(line)
        diff = result.get("differs_from_results_json", {}).get(split)
        if diff is not None:
            print(f"overall {split} metrics {'equal' if diff == 0 else f'differ by up to {diff:.1e} from'} "
                  "those in the run's results.json")
        print()
    print(f"wrote {path}")
    return 0


def cmd_plot_trajectories(args: argparse.Namespace) -> int:
    from fortress.plots import trajectories
    out = args.out or str(Path(args.run_dirs[0]) / "trajectories.png")
    path, steps = trajectories(args.run_dirs, out, args.users, args.min_len, args.seed)
    for run_dir, step in steps.items():
        print(f"{run_dir}: mean step between consecutive prefixes {step:.4f} ({args.users} users)")
    print(f"wrote {path}")
    return 0


def cmd_plot_embeddings(args: argparse.Namespace) -> int:
    from fortress.plots import embeddings
    out = args.out or str(Path(args.run_dirs[0]) / "embeddings.png")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    path, stats = embeddings(args.run_dirs, out, args.popular_frac, targets, args.sample, args.seed)
    for run_dir, st in stats.items():
        print(f"{run_dir}: targets' median chord distance to popular items {st['target_median_distance']:.3f}; "
              f"{st['other_items_closer']:.1%} of other items are closer; target length "
              f"{st['target_length']:.2f} popular median norms")
    print(f"wrote {path}")
    return 0


def cmd_deploy_demo(args: argparse.Namespace) -> int:
    from fortress import config
    from fortress.flower import deploy
    sets = list(args.set or [])
    cfg = config.load(args.config, sets)              # one-line errors here, before any process starts
    given = dict(config.parse_sets(sets))
    if args.config:
        given = {**config.read_toml(args.config), **given}
    values: dict[str, object] = {k.replace("_", "-"): getattr(cfg, k) for k in given}
    values.update({"data": args.data, "resume": args.resume})
    folder = Path(args.dir)
    if args.simulation and cfg.attack != "none":
        raise InputError("--simulation: Flower's simulation gives every virtual node users, so an attack (which "
                         "runs on an attacker node) needs the deployment: leave out --simulation")
    if not args.certs_only:          # the app, the server's output folder and the nodes' data, checked before any process starts
        deploy.app_dir()
        from fortress import simulate
        from fortress.data import load_data
        simulate.check_out(folder / "out", cfg, args.resume, args.overwrite)
        from fortress.population import hosted
        simulate.check_data(cfg, hosted(load_data(args.data, cfg)))    # what the nodes will load
        if args.overwrite:
            simulate.clear_out(folder / "out")
    if args.certs_only:
        certs = deploy.make_certs(folder / "certs", args.server_host)
        keys = deploy.make_node_keys(folder / "keys", args.nodes)
        print(f"wrote {certs['ca']}, {certs['cert']}, {certs['key']} (for {', '.join(args.server_host)}) "
              f"and {len(keys)} SuperNode key pairs in {folder / 'keys'}")
        return 0
    kind = "simulation" if args.simulation else ("TLS + SuperNode authentication" if not args.insecure else "insecure")
    attackers = int(cfg.attack != "none")        # the malicious clients run on a SuperNode of their own
    print(f"starting a SuperLink and {args.nodes} {'virtual ' if args.simulation else ''}SuperNodes"
          f"{' and an attacker SuperNode' if attackers else ''} on 127.0.0.1 ({kind}); logs in {folder.resolve()}",
          file=sys.stderr)
    out = deploy.deploy_demo(folder, args.nodes, values, simulation=args.simulation, secure=not args.insecure,
                             cpus=args.cpus, attackers=attackers)
    import json
    from fortress.simulate import summary
    print(summary(json.loads((out / "results.json").read_text())))
    print(f"stopped all processes; wrote {out / 'results.json'} and {out / 'model.pt'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fortress.data.load import FORMATS
    p = Parser(prog="fortress", description="Robust federated sequential recommendation.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="train and evaluate one configuration")
    run.add_argument("--data", required=True, help="data file or folder, a name in $FORTRESS_DATA, or 'synthetic'")
    run.add_argument("--out", required=True,
                     help="output folder (results.json, model.pt); one that holds a run needs --resume or --overwrite")
    run.add_argument("--config", help="TOML file of config keys")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--format", choices=FORMATS, help="data format")
    run.add_argument("--quiet", action="store_true", help="no progress bar, no data summary on stderr")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="fedavg, fortress: continue the run in OUT from its checkpoint.pt (see checkpoint_every)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in OUT (its results.json, model.pt and checkpoint.pt are removed first)")
    run.set_defaults(func=cmd_run)

    exp = sub.add_parser("experiment", help="run a grid of runs from a spec file (resumable) and write DIR/report.md")
    exp.add_argument("spec", help="spec file, e.g. experiments/smoke.toml")
    exp.add_argument("--out", required=True, help="folder for the cells, figures and report.md (re-run to resume)")
    exp.add_argument("--jobs", type=int, default=1, help="cells run in parallel (each its own process)")
    exp.add_argument("--shard", type=_shard, default=(1, 1), metavar="I/N",
                     help="run only shard I of N (every N-th cell, and those they start from); shards may share --out")
    exp.add_argument("--budget", type=_duration, metavar="TIME",
                     help="start no cell after this long (e.g. 2h, 45m); running cells finish, a re-run resumes")
    exp.add_argument("--dry-run", action="store_true", help="check the spec and list the cells and their commands")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=cmd_experiment)

    rep = sub.add_parser("report", help="(re)write DIR/report.md from the cells' summaries in DIR; list missing cells")
    rep.add_argument("dir", help="the --out folder of `fortress experiment`, or a folder made by --publish")
    rep.add_argument("--publish", metavar="DEST",
                     help="also copy the spec, the summaries and the figures (no models) to DEST, e.g. "
                          "docs/results/NAME, and write DEST/report.md from them")
    rep.set_defaults(func=cmd_report)

    dep = sub.add_parser("deploy-demo", help="run the Flower app on a local SuperLink + SuperNodes (TLS, node auth)")
    dep.add_argument("--nodes", type=_at_least(1), default=3,
                     help="SuperNodes (each hosts users u with u %% nodes == its id)")
    dep.add_argument("--dir", default="runs/deploy", help="certificates, keys, logs, and out/ with the results")
    dep.add_argument("--data", default="synthetic", help="data for every node (as in `run`); the server gets none")
    dep.add_argument("--config", help="TOML file of config keys")
    dep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    again = dep.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from DIR/out/checkpoint.pt")
    again.add_argument("--overwrite", action="store_true", help="replace the run in DIR/out")
    dep.add_argument("--simulation", action="store_true", help="Flower simulation (Ray) instead of processes")
    dep.add_argument("--cpus", type=_at_least(1), default=2, help="--simulation: CPUs for Ray (one per ClientApp)")
    dep.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    dep.add_argument("--certs-only", action="store_true", help="only write certificates and node keys, for several machines")
    dep.add_argument("--server-host", nargs="+", default=["127.0.0.1", "localhost"],
                     help="--certs-only: the SuperLink's IPs/names the certificate must cover")
    dep.set_defaults(func=cmd_deploy_demo)

    data = sub.add_parser("data", help="inspect datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    stats = dsub.add_parser("stats", help="users, items, interactions, density, length percentiles")
    stats.add_argument("path", help="data file or folder, a name in $FORTRESS_DATA, or 'synthetic'")
    stats.add_argument("--format", default="auto", choices=FORMATS)
    stats.add_argument("--kcore", type=_at_least(0), default=0, help="k-core filter on users and items (0 = off)")
    stats.set_defaults(func=cmd_data_stats)

    rec = sub.add_parser("recommend", help="top-K unseen items for a user from a saved run")
    rec.add_argument("run_dir", help="output folder of `fortress run`")
    rec.add_argument("--user", required=True, help="user id as in the data (or its readable name)")
    rec.add_argument("-k", type=int, default=10)
    rec.set_defaults(func=cmd_recommend)

    ev = sub.add_parser("eval", help="evaluate a saved run again: HR/NDCG@K overall and by history length and "
                                     "target popularity (writes RUN_DIR/strata.json)")
    ev.add_argument("run_dir", help="output folder of `fortress run`")
    ev.add_argument("--split", choices=("test", "valid", "both"), default="test", help="split to evaluate")
    ev.add_argument("--data", help="the run's data (default: the dataset the run names, looked up as `run --data` does)")
    ev.add_argument("--out", help="JSON file (or a folder, for its strata.json) to write; default RUN_DIR/strata.json")
    ev.add_argument("--threads", type=_at_least(0), default=0, help="torch threads (0: as threads=0 of `run`)")
    ev.set_defaults(func=cmd_eval)

    plot = sub.add_parser("plot", help="figures from saved runs")
    psub = plot.add_subparsers(dest="plot_command", metavar="COMMAND", required=True)
    traj = psub.add_parser("trajectories", help="user representations of growing prefixes, 2-D, one panel per run")
    traj.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders of `fortress run` on the same data")
    traj.add_argument("--out", help="PNG path (default RUN_DIR/trajectories.png of the first run)")
    traj.add_argument("--users", type=_at_least(1), default=6, help="users to draw")
    traj.add_argument("--min-len", type=_at_least(2), default=8, help="only users with at least this many items")
    traj.add_argument("--seed", type=_at_least(0), default=0, help="which users are sampled")
    traj.set_defaults(func=cmd_plot_trajectories)
    emb = psub.add_parser("embeddings", help="item embeddings (popular, targets, rest) and target-to-popular distances")
    emb.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders of `fortress run` on the same data")
    emb.add_argument("--out", help="PNG path (default RUN_DIR/embeddings.png of the first run)")
    emb.add_argument("--popular-frac", type=_fraction, default=0.02,
                     help="share of items, by train count, drawn as popular")
    emb.add_argument("--targets", help="comma-separated item ids (default: each run's attack targets)")
    emb.add_argument("--sample", type=_at_least(1), default=3000, help="other items drawn")
    emb.add_argument("--seed", type=_at_least(0), default=0, help="which other items are sampled")
    emb.set_defaults(func=cmd_plot_embeddings)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one `fortress` command; bad input is one `error:` line on stderr and exit status 2."""
    warnings.showwarning = lambda msg, *a, **k: print(f"warning: {printable(str(msg))}", file=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except InputError as err:
        print(f"error: {printable(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`fortress data stats X | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
