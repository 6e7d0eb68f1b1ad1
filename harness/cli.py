"""`harness sweep | status | eval | leaderboard | report | list | bench`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.spec.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def _sweep(args: argparse.Namespace) -> int:
    from harness.spec.config import load_config

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    # raises ConfigError before Ray starts; `key=value` overrides are checked like the file
    cfg = load_config(args.config, overrides, assignments=args.overrides)
    if args.dry_run:  # resolves keys and reads the output dir; writes nothing, no Ray
        from harness.sweeps.plan import format_dry_run, sweep_plan

        out = Path(cfg.output_dir).resolve()
        print(format_dry_run(cfg, sweep_plan(cfg, out, write=False), out))
        return 0
    # Imported only now: Ray, torch and pandas take seconds, a typo's report should not.
    from harness.sweeps.sweep import SweepInterrupted, run_sweep

    try:
        run_sweep(cfg, address=args.address)
    except SweepInterrupted as err:
        print(f"interrupted: rerun the same command to resume ({err})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before any trial ran (reading data, starting Ray)
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _status(args: argparse.Namespace) -> int:
    from harness.sweeps.plan import format_status

    print(format_status(Path(args.output_dir)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from harness.reporting import lm_eval_interop

    names = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if not names:
        raise ConfigError("--lm-eval needs at least one task name")
    loaded = lm_eval_interop.load_model(args.adapter_or_run, args.model)
    out = lm_eval_interop.evaluate(
        loaded, names, include_path=args.include_path, limit=args.limit,
        num_fewshot=args.num_fewshot, batch_size=args.batch_size, log_samples=args.log_samples,
    )  # fmt: skip
    target = Path(args.adapter_or_run)
    path = Path(args.output or (target / "lm_eval.json" if target.is_dir() else "lm_eval.json"))
    path.write_text(json.dumps(out, indent=2, sort_keys=True))
    print("\n".join(lm_eval_interop.summary_lines(out)))
    print(path)
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from harness.reporting.results import leaderboard_warnings, save_leaderboard
    from harness.sweeps.plan import planned_keys

    out = Path(args.output_dir)
    board, table = save_leaderboard(out, args.markdown, planned_keys(out))  # ResultsError
    for note in leaderboard_warnings(board):
        print(f"warning: {note}", file=sys.stderr)
    print(table)
    return 0


def _report(args: argparse.Namespace) -> int:
    from harness.reporting.report import write_report
    from harness.reporting.results import LEADERBOARD_FILE, RUNS_FILE, has_runs

    out = Path(args.output_dir)
    if not has_runs(out) and not (out / LEADERBOARD_FILE).is_file():
        raise ConfigError(f"no {RUNS_FILE} or {LEADERBOARD_FILE} in {out}")
    # ResultsError (a ConfigError) on bad files
    html_path, md_path = write_report(out, bench_json=args.bench)
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

    if args.all:
        import dataclasses

        from harness.bench.suite import Settings, markdown, run_suite

        settings = Settings(model=args.model, threads=args.threads)
        if args.steps != STEPS_DEFAULT:  # --all has its own default (Settings.timed_steps)
            settings = dataclasses.replace(settings, timed_steps=args.steps)
        payload = run_suite(settings, repeats=args.repeats, progress=_stderr)
        print(markdown(payload))
        print("\n".join(payload.get("written", [])))
    elif args.llm_width:
        from harness.bench.width import WidthSettings, markdown, run_width

        payload = run_width(base=WidthSettings(threads=args.threads), progress=_stderr)
        print(markdown(payload))
        print("\n".join(payload.get("written", [])))
    elif args.init:
        bench_init_cost()
    else:
        bench_train_step(steps=args.steps, repeats=args.repeats, method=args.method)
    return 0


STEPS_DEFAULT = 30  # `harness bench` (harness vs bare); --all defaults to its own


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run a sweep config on Ray Tune")
    sweep.add_argument("config", help="sweep YAML file")
    sweep.add_argument("--address", help="Ray cluster address (default: config, else local)")
    sweep.add_argument("--output-dir", help="override the config's output_dir")
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys, values as YAML: budget.max_steps=10 seeds=[0]",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="print the grid, resolved keys, what is done and the cost; run nothing",
    )
    sweep.set_defaults(func=_sweep)

    status = sub.add_parser("status", help="done/pending/failed counts, running trials, ETA")
    status.add_argument("output_dir")
    status.set_defaults(func=_status)

    lmeval = sub.add_parser(
        "eval", help="evaluate a saved adapter / run / model with lm-evaluation-harness tasks"
    )
    lmeval.add_argument(
        "adapter_or_run",
        help="OUT/adapters/<key>/ (a saved run), a peft adapter folder, or a model folder/id",
    )
    lmeval.add_argument("--lm-eval", required=True, help="lm-eval task names, comma-separated")
    lmeval.add_argument("--model", help="base model id/folder (default: the adapter's own)")
    lmeval.add_argument("--include-path", help="folder of local lm-eval task YAMLs")
    lmeval.add_argument("--limit", type=float, help="lm-eval: documents per task (or fraction)")
    lmeval.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples")
    lmeval.add_argument("--batch-size", type=int, default=8)
    lmeval.add_argument("--log-samples", action="store_true", help="per-document responses too")
    lmeval.add_argument(
        "--output", help="results JSON (default: ADAPTER_OR_RUN/lm_eval.json, else ./lm_eval.json)"
    )
    lmeval.set_defaults(func=_eval)

    board = sub.add_parser("leaderboard", help="rebuild and print leaderboard.parquet")
    board.add_argument("output_dir")
    board.add_argument("--markdown", help="also write the table to this Markdown file")
    board.set_defaults(func=_leaderboard)

    report = sub.add_parser("report", help="write an HTML + Markdown report of an output dir")
    report.add_argument("output_dir")
    report.add_argument(
        "--bench", help="a `harness bench --all` JSON to show (default: the newest in "
        "<output_dir>/bench/ or beside it, e.g. results/bench/<machine>/)",
    )  # fmt: skip
    report.set_defaults(func=_report)

    lister = sub.add_parser("list", help="list registered methods or tasks")
    lister.add_argument("what", choices=["methods", "tasks"])
    lister.add_argument(
        "--verbose", action="store_true", help="methods: each default vs paper and official code"
    )
    lister.set_defaults(func=_list)

    bench = sub.add_parser("bench", help="harness train step vs a bare peft+torch loop")
    bench.add_argument("--steps", type=int, default=STEPS_DEFAULT)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--method", default="lora")
    bench.add_argument(
        "--init", action="store_true", help="init cost of lora_ga / lora_one / lora_sb instead"
    )
    bench.add_argument(
        "--all", action="store_true",
        help="every registered method side by side, with the papers' cost targets and MFU "
        "(--steps: timed steps per sample, --repeats: rounds); writes results/bench/",
    )  # fmt: skip
    bench.add_argument(
        "--llm-width", action="store_true",
        help="init memory of the data-informed inits at hidden 2048/4096 (random init, CPU) "
        "vs harness/sweeps/memory_estimate.py; writes results/bench/",
    )  # fmt: skip
    bench.add_argument("--model", default="minilm", help="--all: minilm or tiny-random-bert")
    bench.add_argument("--threads", type=int, default=1, help="--all/--llm-width: torch threads")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may follow options (`sweep C --dry-run a=1`), which plain
    # parse_args does not allow for a positional list.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "sweep" and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
