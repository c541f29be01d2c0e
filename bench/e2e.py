"""End-to-end benchmark; the implementation is the installed module ``sparsespec_compile.benchmark`` (also
``sparsespec bench``), so it runs where the package is installed without this checkout on the path.

    python bench/e2e.py --model smollm2 --batch-sizes 16 32 64 --output-lens 1024 4096 --out bench_out/e2e
"""

import os
import sys

# `python bench/e2e.py` puts bench/ first on sys.path, where bench/kernels.py would shadow the `kernels` package
# that transformers probes for: drop this folder from the path before anything imports transformers.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from sparsespec_compile.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
