"""Compare runs: `python src/compare.py <sweep dirs, run dirs or result CSVs ...> [--by KEY ...] [--vs KEY]`.

Prints mean ± std over seeds per group (and each column's gain over the baseline, with its 95%
confidence interval and the one-sided p-value that it beats the baseline) and writes
comparison.csv, comparison.md, locality_trends.csv (when runs kept a locality.csv) and plots into
--out (default: the first input's folder), and nothing else: a sweep is read as its jobs are now
(--write-summary also writes its summary.csv).
"""
import argparse
import sys

from convitlab.core.errors import UserError
from convitlab.results.compare import compare_results


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="a sweep directory, a run directory, or a result/summary CSV (each run counts once)")
    parser.add_argument("--by", nargs="+", metavar="KEY",
                        help="row keys (default: the knobs that vary, seed never)")
    parser.add_argument("--vs", metavar="KEY", help="column key (default: model if it varies, else ablation)")
    parser.add_argument("--baseline", metavar="VALUE",
                        help="the --vs value gains are relative to (default: the one without GPSA layers)")
    parser.add_argument("--metric", default="top1", help="top1 (final, default), best_top1 or top5")
    parser.add_argument("--kind", default="train",
                        help="train (default: training runs), eval (eval.py's rows) or all")
    parser.add_argument("--out", metavar="DIR", help="where to write the table and plots")
    parser.add_argument("--write-summary", action="store_true",
                        help="also write each sweep directory's summary.csv (reading a sweep writes nothing)")
    parser.add_argument("--no-plots", action="store_true", help="write the table only")
    args = parser.parse_args(argv)
    if args.by is not None:  # --by fraction dataset and --by fraction,dataset alike
        args.by = [key for item in args.by for key in item.split(",") if key]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = compare_results(args.inputs, metric=args.metric, by=args.by, vs=args.vs, baseline=args.baseline,
                                 out=args.out, plots=not args.no_plots, kind=args.kind,
                                 write_summary=args.write_summary)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
