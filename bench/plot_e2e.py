"""Redraw the end-to-end benchmark's markdown table and PNG from its JSON: on a machine with matplotlib when the
GPU run had none, after a run was cut short (the JSON is rewritten after every cell; the table and the PNG only
at the end), or over several runs at once (a grid split across device calls: their records are concatenated,
the environment is the first file's).

    python bench/plot_e2e.py bench_out/e2e/e2e.json [more.json ...] [--png out.png]
                                                   # default PNG: e2e.png beside the first JSON
"""

import argparse
import json
import os
import sys
from pathlib import Path

_here = os.path.dirname(os.path.abspath(__file__))  # see bench/e2e.py: bench/kernels.py shadows `kernels`
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from sparsespec_compile.benchmark import PNG_NAME, add_speedups, markdown_table, plot_results  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    results = [json.loads(p.read_text()) for p in args.json]
    result = {**results[0], "records": [r for res in results for r in res["records"]]}
    if len(results) > 1:
        result["environment"] = {**result["environment"], "command": " ; ".join(
            res["environment"]["command"] for res in results)}
    add_speedups(result["records"])  # a cut-short run never reached this step
    print(markdown_table(result))
    png = plot_results(result, args.png or args.json[0].with_name(PNG_NAME))
    if png is not None:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
