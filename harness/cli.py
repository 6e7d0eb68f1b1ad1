"""`harness sweep | leaderboard | report | list | bench`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def _sweep(args: argparse.Namespace) -> int:
    from harness.config import load_config

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    cfg = load_config(args.config, overrides)  # raises ConfigError before Ray starts
    # Imported only now: Ray, torch and pandas take seconds, a typo's report should not.
    from harness.sweep import SweepInterrupted, run_sweep

    try:
        run_sweep(cfg, address=args.address)
    except SweepInterrupted as err:
        print(f"interrupted: rerun the same command to resume ({err})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before any trial ran (reading data, starting Ray)
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from harness.results import leaderboard_warnings, save_leaderboard

    board, table = save_leaderboard(Path(args.output_dir), args.markdown)  # ResultsError
    for note in leaderboard_warnings(board):
        print(f"warning: {note}", file=sys.stderr)
    print(table)
    return 0


def _report(args: argparse.Namespace) -> int:
    from harness.report import write_report
    from harness.results import LEADERBOARD_FILE, RUNS_FILE, has_runs

    out = Path(args.output_dir)
    if not has_runs(out) and not (out / LEADERBOARD_FILE).is_file():
        raise ConfigError(f"no {RUNS_FILE} or {LEADERBOARD_FILE} in {out}")
    html_path, md_path = write_report(out)  # ResultsError (a ConfigError) on bad files
    print(html_path)
    print(md_path)
    return 0


def _list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        import methods
        from methods.defaults import render_text
        from methods.presets import preset_names

        for name in methods.method_names():
            print(f"{name:10s} {methods.get_method(name).description}")
            if getattr(args, "verbose", False):  # the defaults table (methods/DEFAULTS.md)
                print("\n".join(render_text(name)))
                if presets := preset_names(name):
                    print(f"    presets: {', '.join(presets)} (methods/presets.py)")
    else:
        import tasks

        for task_id in tasks.task_ids():
            print(f"{task_id:22s} {tasks.get_task(task_id).description}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from harness.bench import bench_init_cost, bench_train_step

    if args.init:
        bench_init_cost()
    else:
        bench_train_step(steps=args.steps, repeats=args.repeats, method=args.method)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run a sweep config on Ray Tune")
    sweep.add_argument("config", help="sweep YAML file")
    sweep.add_argument("--address", help="Ray cluster address (default: config, else local)")
    sweep.add_argument("--output-dir", help="override the config's output_dir")
    sweep.set_defaults(func=_sweep)

    board = sub.add_parser("leaderboard", help="rebuild and print leaderboard.parquet")
    board.add_argument("output_dir")
    board.add_argument("--markdown", help="also write the table to this Markdown file")
    board.set_defaults(func=_leaderboard)

    report = sub.add_parser("report", help="write an HTML + Markdown report of an output dir")
    report.add_argument("output_dir")
    report.set_defaults(func=_report)

    lister = sub.add_parser("list", help="list registered methods or tasks")
    lister.add_argument("what", choices=["methods", "tasks"])
    lister.add_argument(
        "--verbose", action="store_true", help="methods: each default vs paper and official code"
    )
    lister.set_defaults(func=_list)

    bench = sub.add_parser("bench", help="harness train step vs a bare peft+torch loop")
    bench.add_argument("--steps", type=int, default=30)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--method", default="lora")
    bench.add_argument(
        "--init", action="store_true", help="init cost of lora_ga / lora_one / lora_sb instead"
    )
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
