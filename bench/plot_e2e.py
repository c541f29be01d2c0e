"""Redraw the end-to-end benchmark's PNG and markdown table from its JSON: on a machine with matplotlib when the
GPU run had none, or after a run was cut short (the JSON is rewritten after every cell; the table and the PNG
only at the end).

    python bench/plot_e2e.py bench_out/e2e/e2e.json [out.png]      # default: e2e.png beside the JSON
"""

import json
import os
import sys
from pathlib import Path

_here = os.path.dirname(os.path.abspath(__file__))  # see bench/e2e.py: bench/kernels.py shadows `kernels`
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from sparsespec_compile.benchmark import PNG_NAME, add_speedups, markdown_table, plot_results  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    src = Path(argv[0])
    result = json.loads(src.read_text())
    add_speedups(result["records"])  # a cut-short run never reached this step
    print(markdown_table(result))
    png = plot_results(result, argv[1] if len(argv) > 1 else src.with_name(PNG_NAME))
    if png is not None:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
