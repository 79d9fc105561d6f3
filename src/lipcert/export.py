"""Export a lipcert model to plain ``torch.nn`` modules (and ONNX).

Every :class:`~lipcert.nn.constraint.LipschitzLayer` is replaced by its ``export()``; any other
parametrized module keeps its current values with the parametrization removed. The values are
those ``model``'s own eval-mode forward uses, cached ones included (after a write that bumps no
version counter, ``weight.data``, a fresh copy would fold the new weights while the model still
computes with the cached ones). The result is in eval mode and computes the same outputs as
``model.eval()``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipcert.bounds.graph import check_input_fits, natural_dtype
from lipcert.bounds.network import checked_input_shape
from lipcert.finite import check_finite
from lipcert.modes import eval_mode
from lipcert.nn.constraint import LipschitzLayer
from lipcert.outputs import check_output_file, output_file

#: What a NaN or inf tensor means for export.
NOT_EXPORTED = "a model computing NaN is not exported"


def _export_tree(original: nn.Module, copied: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
    """``copied`` (a deep copy of ``original``) with each constrained module replaced by the plain
    version of ``original``'s: the values its eval-mode forward uses (cached ones included).
    ``done`` maps the modules exported so far (by id) to their exports: a module held in several
    places (``nn.Sequential(a, act, a)``, which ``named_children`` lists once) is exported in
    each of them, as one shared plain module."""
    if id(original) in done:
        return done[id(original)]
    if isinstance(original, LipschitzLayer):
        plain = original.export()
    else:
        plain = _without_parametrizations(original, copied)
        for name, child in original._modules.items():
            if child is not None and name in plain._modules:  # not the parametrizations
                setattr(plain, name, _export_tree(child, plain._modules[name], done))
    done[id(original)] = plain
    return plain


def _without_parametrizations(original: nn.Module, copied: nn.Module) -> nn.Module:
    """``copied`` with each parametrized tensor of ``original`` made plain, holding the value
    ``original`` computes for it (a parameter where the parametrization held one, else a buffer).

    Not ``torch.nn.utils.parametrize.remove_parametrizations``: it deletes the tensor's property
    from the module's parametrized class, which a deep copy shares with the original (after an
    export, a ``spectral_norm`` Linear raised AttributeError: no attribute 'weight')."""
    if not parametrize.is_parametrized(original):
        return copied
    copied.__class__ = parametrize.type_before_parametrizations(original)
    removed = copied._modules.pop("parametrizations")
    for name, parametrizations in removed.items():
        value = getattr(original, name).detach().clone()
        held = next(parametrizations.parameters(recurse=False), None)
        if held is None:
            copied.register_buffer(name, value)
        else:
            copied.register_parameter(name, nn.Parameter(value, held.requires_grad))
    return copied


def export(
    model: nn.Module,
    onnx_path: str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Return a plain-``torch.nn`` copy of ``model`` with its constraints folded into the weights.

    With ``onnx_path`` (and ``input_shape``, without the batch dimension) also write an ONNX file
    with a dynamic batch dimension. ValueError for a NaN or inf parameter (named as in
    ``model.state_dict()``) or exported tensor, and for an ``input_shape`` that is not a sequence
    of ints >= 1 or that the model cannot take.
    """
    if onnx_path is not None:
        if input_shape is None:
            raise ValueError("export(onnx_path=...) needs input_shape (without the batch dim)")
        input_shape = checked_input_shape(input_shape)
        check_output_file(onnx_path, "the ONNX path")  # before any work
    with torch.no_grad(), eval_mode(model):  # every module's own mode is restored after
        check_finite(((f"parameter {k}", p) for k, p in model.named_parameters()), NOT_EXPORTED)
        plain = _export_tree(model, copy.deepcopy(model), {}).eval()
    exported = ((f"exported tensor {k}", t) for k, t in plain.state_dict().items())
    check_finite(exported, NOT_EXPORTED)  # a constraint's NaN, a buffer's
    if onnx_path is not None:
        write_onnx(plain, Path(onnx_path), input_shape)
    return plain


def write_onnx(plain: nn.Module, path: Path, input_shape: tuple[int, ...]) -> None:
    """Write ``plain`` as ONNX (batch dimension dynamic), atomically. The input takes the dtype
    the model computes in (:func:`~lipcert.bounds.graph.natural_dtype`, buffers included: an
    exported l_inf-distance net holds buffers only, and a float64 one took float32 inputs)."""
    example = torch.zeros((2, *input_shape), dtype=natural_dtype(plain))
    check_input_fits(plain, input_shape, example)
    with output_file(path, "the ONNX path") as tmp:
        torch.onnx.export(
            plain,
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            dynamo=False,
        )
