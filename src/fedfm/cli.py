"""The ``fedfm`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

from fedfm import __version__
from fedfm.config import describe, load_config
from fedfm.errors import FedfmError
from fedfm.interrupt import RunInterrupted


class _Parser(argparse.ArgumentParser):
    """argparse with fedfm's error line: the usage, then ``fedfm: error: <message>``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"fedfm: error: {message}\n")


def _positive_int(text: str) -> int:
    """An option's value as an integer >= 1 (``--batch-size``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedfm",
        description="Federated LoRA fine-tuning of foundation models on biomedical data (Flower + peft).",
    )
    parser.add_argument("--version", action="version", version=f"fedfm {__version__}")
    parser.add_argument("--verbose", dest="traceback", action="store_true",
                        help="with an error, also print the Python traceback (before the command: fedfm --verbose ...)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run a federated fine-tune in Flower's simulation engine")
    run.add_argument("config", nargs="?", help="TOML run configuration (defaults when omitted)")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set federation.num-rounds=3 (repeatable)",
    )
    run.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    run.add_argument("--no-progress", action="store_true", help="show no progress display (on stderr)")
    run.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue a killed or stopped run from its last complete round (its own config unless one is given)",
    )
    run.add_argument(
        "--overwrite", action="store_true",
        help="delete the fedfm run already in --out and start afresh (without it a non-empty --out is refused)",
    )

    check = commands.add_parser("check", help="validate a configuration and print it resolved")
    check.add_argument("config", nargs="?")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    report = commands.add_parser("privacy-report", help="print a run's privacy ledger (ε per hospital and round, audit, what left)")
    report.add_argument("run_dir", help="a run directory written by fedfm run")
    report.add_argument("--plot", metavar="PNG", help="also draw ε over rounds into this PNG file")

    for name, text in (("predict", "run an exported model on every row of a CSV, JSON-lines or Parquet file"),
                       ("evaluate", "score an exported model on a labelled file with fedfm's metrics")):
        infer = commands.add_parser(name, help=text)
        # `fedfm evaluate --benchmark` scores a model on a question suite: no --input, the model by --model.
        infer.add_argument("--adapter", required=name == "predict", metavar="DIR",
                           help="a run's adapter/ or merged/ folder")
        infer.add_argument("--input", required=name == "predict", metavar="FILE",
                           help="rows as .csv, .jsonl or .parquet; an image classifier also takes a folder with one "
                                "sub-folder of images per class" + (" or one image file" if name == "predict" else ""))
        infer.add_argument("--output", *(("--out",) if name == "evaluate" else ()), metavar="FILE",
                           help="predictions as .csv or .jsonl" if name == "predict"
                           else "also write the metrics (with --benchmark: the scores and answers) to this .json file")
        infer.add_argument("--text-column", help="the column holding the text, or an image classifier's image paths "
                                                 "(default: the one trained on)")
        infer.add_argument("--label-column", help="the column holding the label (default: the one trained on)")
        infer.add_argument("--base-model", metavar="DIR", help="the base model's folder, if not found by its name")
        infer.add_argument("--batch-size", type=_positive_int, default=32, help="rows per forward pass (default 32)")
        if name == "predict":
            infer.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N",
                               help="an instruction-tuned model: the most tokens of each generated answer "
                                    "(default 256; greedy decoding)")
        if name == "evaluate":
            infer.add_argument("--benchmark", metavar="SUITE",
                               help="score a causal LM on a question suite instead of a file: 'medical' (PubMedQA, "
                                    "MedMCQA, MedQA as FlowerTune LLM's medical track)")
            infer.add_argument("--model", metavar="NAME_OR_DIR",
                               help="with --benchmark: a model alias (default smollm2-135m), a model folder, or a "
                                    "causal-qa or instruction-tuning run's adapter/ or merged/ folder")
            infer.add_argument("--limit", type=_positive_int, metavar="N",
                               help="with --benchmark: only the first N questions of each benchmark")

    run_report = commands.add_parser("report", help="plot a run's metrics, ε and bytes per round into a report.md; "
                                                    "with several runs, a comparison.md side by side")
    run_report.add_argument("run_dir", nargs="+", help="a run directory written by fedfm run (finished, stopped or "
                                                       "running); two or more to compare them")
    run_report.add_argument("--out", metavar="DIR", help="where the report goes (default: RUN_DIR/report); "
                                                         "required when comparing several runs")

    hospital = commands.add_parser(
        "hospital",
        help="run a hospital's ClientApp tasks in one long-lived process beside its SuperNode (--isolation process)",
        description="Serve the ClientApp tasks of a SuperNode started with `flower-supernode --isolation process`: "
                    "this process takes flower-superexec's place and runs every instruction itself, so the base "
                    "model and the hospital's tokenized rows load once per run (docs/how-to/deploy.md).",
    )
    hospital.add_argument("--runtime-api-address", default="127.0.0.1:9094", metavar="HOST:PORT",
                          help="the SuperNode's Runtime API, its --host and --port (default 127.0.0.1:9094)")
    hospital.add_argument("--insecure", action="store_true",
                          help="plain HTTP to a SuperNode on this machine (its Runtime API has no --ssl-certfile)")
    hospital.add_argument("--root-certificates", metavar="CA.pem",
                          help="the CA certificate that signed the SuperNode's Runtime API --ssl-certfile")
    hospital.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                          help="torch threads for training (default: torch's own choice, every core)")

    commands.add_parser("config-reference", help="list every configuration key with its default and meaning")
    commands.add_parser("strategies", help="list the registered aggregation strategies")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedfm`` command; returns the exit status."""
    # Before torch loads anywhere: see runner._environment.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # `federation.strategy = "module:Class"` imports the user's module from where they run fedfm, as `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed as `fedfm: error:`
        return done.code if isinstance(done.code, int) else 2
    try:
        if args.command == "run":
            if args.resume and not args.config:
                config = load_config(Path(args.resume) / "config.toml", args.overrides)
            else:
                config = load_config(args.config, args.overrides)
            from fedfm.runner import run  # checks the strategy before anything loads

            result = run(config, out=args.out, verbose=args.verbose, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.no_progress)
            print()
            print(result.table())
            print(f"\nrun directory: {result.run_dir}")
            return 0
        if args.command == "check":
            config = load_config(args.config, args.overrides)
            from fedfm.errors import ConfigError
            from fedfm.preflight import config_problems

            problems = config_problems(config)  # what needs no data; `fedfm run` checks the data too
            if problems:
                raise ConfigError(problems)
            print(config.to_toml())
            return 0
        if args.command == "strategies":
            from fedfm import strategies

            for name in strategies.available():
                entry = strategies.entry(name)
                doc = (entry.cls.__doc__ or "").strip().splitlines()
                linear = "linear" if entry.linear else "non-linear"
                print(f"{name:15} {linear:10} {doc[0] if doc else entry.cls.__name__}")
            return 0
        if args.command == "privacy-report":
            from fedfm.privacy.report import PLOT_SUFFIX, ReportError, ledger_table, plot_epsilon
            from fedfm.report import read_run, unwritable

            plot = Path(args.plot) if args.plot else None
            if plot is not None and plot.suffix.lower() != PLOT_SUFFIX:
                raise ReportError(f"--plot {plot}: the plot is a PNG image, so the file name must end in '.png'")
            if plot is not None and (problem := unwritable(plot)):
                raise ReportError(f"--plot {plot} cannot be written: {problem}; choose another path")
            run_files = read_run(args.run_dir)  # the reader of `fedfm report`: a corrupt file is named
            print(ledger_table(run_files.rounds, run_files.summary))
            if plot is not None:
                print(f"plot: {plot_epsilon(run_files.rounds, plot)}")
            return 0
        if args.command == "evaluate" and (problem := _benchmark_problem(args)):
            return _error(problem, args.traceback)
        if args.command == "evaluate" and args.benchmark is not None:
            from fedfm.benchmark import DEFAULT_MODEL, evaluate_suite

            report = evaluate_suite(args.benchmark, model=args.model or args.adapter or DEFAULT_MODEL,
                                    base_model=args.base_model, limit=args.limit, output=args.output,
                                    batch_size=args.batch_size)
            print(report.table())
            if args.output:
                print(f"scores: {args.output}")
            return 0
        if args.command in ("predict", "evaluate"):
            from fedfm import predict

            options = {"output": args.output, "text_column": args.text_column, "label_column": args.label_column,
                       "base_model": args.base_model, "batch_size": args.batch_size}
            if args.command == "evaluate":
                metrics = predict.evaluate_file(args.adapter, args.input, **options)
                print("\n".join(f"{key:12} {value:.4f}" for key, value in metrics.items()))
            else:
                rows, _, _ = predict.predict_file(args.adapter, args.input, max_new_tokens=args.max_new_tokens,
                                                  **options)
                print(f"predicted {len(rows.table)} row(s)" + (f": {args.output}" if args.output else ""))
            return 0
        if args.command == "report" and len(args.run_dir) > 1:
            from fedfm.errors import ReportError
            from fedfm.report_compare import compare_runs

            if not args.out:
                raise ReportError(f"comparing {len(args.run_dir)} runs needs --out DIR, the folder for "
                                  "comparison.md and its plots")
            written = compare_runs(args.run_dir, args.out)
            print(f"comparison: {written}")
            print("\n".join(f"plot:   {plot}" for plot in sorted(written.parent.glob("compare-*.png"))))
            return 0
        if args.command == "report":
            from fedfm.report import PLOTS, write_report

            written = write_report(Path(args.run_dir[0]), Path(args.out) if args.out else None)
            print(f"report: {written}")
            print("\n".join(f"plot:   {written.parent / name}" for name in PLOTS if (written.parent / name).is_file()))
            return 0
        if args.command == "hospital":
            from fedfm.hospital_process import serve
            from fedfm.runner import setup_logging

            setup_logging(args.traceback)
            logging.getLogger("fedfm.adapters").setLevel(logging.DEBUG)  # each base-model load: once per run
            serve(args.runtime_api_address, root_certificates=args.root_certificates, insecure=args.insecure,
                  threads=args.threads or 0)
            return 0
        if args.command == "config-reference":
            print(describe())
            return 0
        parser.print_help()
        return 0
    except RunInterrupted as err:
        print(f"fedfm: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        # The second Ctrl-C (or one before the run started): leave now, without waiting for the server's
        # thread or the hospitals, which may be blocked; the last complete checkpoint is on disk already.
        print("\nfedfm: interrupted", file=sys.stderr, flush=True)
        if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
            sys.stdout.flush()
            os._exit(130)
        return 130
    except FedfmError as err:
        return _error(str(err), args.traceback)
    except UnicodeDecodeError as err:  # a user's file in another encoding, read past fedfm's own checks
        return _error(f"a file is not UTF-8 text ({err}): save it with UTF-8 encoding and try again", args.traceback)
    except OSError as err:
        if err.filename is None:  # not about a file the user named: a fault of fedfm or the machine
            raise
        return _error(f"{err.filename}: {err.strerror or err} (check the path and its permissions)", args.traceback)


def _benchmark_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with how ``fedfm evaluate``'s two forms (a file, a ``--benchmark``) were asked for, if anything."""
    if args.benchmark is None:
        if args.model is not None or args.limit is not None:
            return "--model and --limit go with --benchmark; to score a file, pass --adapter DIR --input FILE"
        missing = [flag for flag, value in (("--adapter", args.adapter), ("--input", args.input)) if value is None]
        return f"the following arguments are required: {', '.join(missing)}" if missing else None
    unused = [flag for flag, value in (("--input", args.input), ("--text-column", args.text_column),
                                       ("--label-column", args.label_column))
              if value is not None]
    if unused:
        return f"--benchmark scores its own questions; {', '.join(unused)} cannot go with it"
    if args.adapter is not None and args.model is not None:
        return "--benchmark scores one model: pass --model or --adapter, not both"
    return None


def _error(message: str, traceback: bool) -> int:
    """The one ``fedfm: error:`` line of a user's mistake (after the traceback, with ``fedfm --verbose``)."""
    if traceback:
        import traceback as tb

        tb.print_exc(file=sys.stderr)
    print(f"fedfm: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
