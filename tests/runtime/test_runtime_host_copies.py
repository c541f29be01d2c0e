"""The runtime's host -> device copies go through ``host_copy.to_device`` (pinned memory, non-blocking). A list made
a tensor on the device directly (``torch.tensor(x, device=...)``, or ``torch.tensor(x).to(device)``) copies from
pageable memory, which waits for the stream: the host stalls behind the device and overlap is lost. One such copy
in ``write_streaming_pillars`` is the likely cause of the 14-20 % idle of streaming runs on the H200
(bench/RESULTS.md)."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def _is_torch_call(node: ast.AST, names: tuple[str, ...]) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch")


def test_runtime_makes_no_blocking_host_to_device_copies():
    found = []
    for path in sorted(RUNTIME.glob("*.py")):
        if path.name == "host_copy.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            direct = _is_torch_call(node, ("tensor", "as_tensor")) and any(k.arg == "device" for k in node.keywords)
            chained = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                       and node.func.attr in ("to", "cuda")
                       and _is_torch_call(node.func.value, ("tensor", "as_tensor")))
            if direct or chained:
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"host lists copied to the device without host_copy.to_device: {found}"
