"""pytest plugin (entry point ``pytest11: sparsespec = sparsespec_compile.testing.pytest_plugin``).

Fixtures for users' test suites:

* ``sparsespec_tolerance``: a function ``dtype -> (atol, rtol)``, the table ``check_rewrite`` uses;
* ``sparsespec_backend``: ``compile(model_or_fn, **torch_compile_kwargs)`` with ``backend="sparsespec"`` on a
  fresh Dynamo state (reset before and after the test), the eager compiler unless the test says otherwise;
* marker ``@pytest.mark.sparsespec``: tags rewrite checks so a CI job can run only them (``-m sparsespec``).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from .checks import tolerance


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sparsespec: checks of the sparsespec rewrite (select with -m sparsespec)")


@pytest.fixture
def sparsespec_tolerance() -> Callable[[torch.dtype], tuple[float, float]]:
    return tolerance


@pytest.fixture
def sparsespec_backend() -> Any:
    torch._dynamo.reset()

    def compile(model: Any, compiler: str = "eager", options: dict | None = None, **kwargs: Any) -> Any:
        return torch.compile(model, backend="sparsespec", options={**(options or {}), "compiler": compiler}, **kwargs)

    yield compile
    torch._dynamo.reset()
