"""Kernel tests run Triton in its CPU interpreter; the variable must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
