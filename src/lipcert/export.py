"""Export a lipcert model to plain ``torch.nn`` modules (and ONNX).

Every :class:`~lipcert.nn.constraint.LipschitzLayer` is replaced by its ``export()``; any other
parametrized module keeps its current values with the parametrization removed. The result is in
eval mode and computes the same outputs as ``model.eval()``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipcert.nn.constraint import LipschitzLayer


def _export_tree(module: nn.Module) -> nn.Module:
    if isinstance(module, LipschitzLayer):
        return module.export()
    if parametrize.is_parametrized(module):
        module = copy.deepcopy(module)
        for name in list(module.parametrizations.keys()):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        return module
    for name, child in module.named_children():
        setattr(module, name, _export_tree(child))
    return module


def export(
    model: nn.Module,
    onnx_path: str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Return a plain-``torch.nn`` copy of ``model`` with its constraints folded into the weights.

    With ``onnx_path`` (and ``input_shape``, without the batch dimension) also write an ONNX file
    with a dynamic batch dimension.
    """
    with torch.no_grad():  # the copy goes to eval mode; the original keeps every module's mode
        plain = _export_tree(copy.deepcopy(model).eval()).eval()
    if onnx_path is not None:
        if input_shape is None:
            raise ValueError("export(onnx_path=...) needs input_shape (without the batch dim)")
        write_onnx(plain, Path(onnx_path), tuple(input_shape))
    return plain


def write_onnx(plain: nn.Module, path: Path, input_shape: tuple[int, ...]) -> None:
    """Write ``plain`` as ONNX (batch dimension dynamic), atomically."""
    param = next(plain.parameters(), None)
    example = torch.zeros((2, *input_shape), dtype=param.dtype if param is not None else None)
    tmp = path.with_name(path.name + ".tmp")
    torch.onnx.export(
        plain,
        (example,),
        str(tmp),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        dynamo=False,
    )
    tmp.replace(path)
