"""Version branches for torch and onnx, kept in one place.

torch >= 2.9 marks TorchScript (``torch.jit.*``) and the TorchScript-based ONNX exporter
as deprecated. Both still work and are what the model files need, so the warnings are
silenced here, where the calls are, instead of in every caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's deprecation and tracer chatter for TorchScript and ONNX export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=r".*Constant folding.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*treespec.*")
        yield


def jit_script_or_trace(
    module: torch.nn.Module, example: torch.Tensor
) -> tuple[torch.jit.ScriptModule, str]:
    """Compile ``module`` to TorchScript, frozen (BatchNorm folded into the convolutions).

    ``torch.jit.script`` keeps the shape arithmetic (crops, pads) general for every input
    size; tracing is the fallback for modules that cannot be scripted and is correct as
    long as their forward pass has no size-dependent Python branches.

    Returns
    -------
    (module, how)
        The frozen module and ``"script"`` or ``"trace"``.
    """
    import torch

    with quiet_torch():
        try:
            compiled, how = torch.jit.script(module), "script"
        except Exception as exc:  # scripting rejects many valid Python modules
            log.info("torch.jit.script failed (%s); tracing instead", exc)
            compiled = torch.jit.trace(module, example, check_trace=False)
            how = "trace"
        compiled.eval()
        return torch.jit.freeze(compiled), how


def jit_save(
    module: torch.jit.ScriptModule, path: str | os.PathLike, extra: Mapping[str, str]
) -> None:
    import torch

    with quiet_torch():
        torch.jit.save(module, str(path), _extra_files=dict(extra))


def jit_load(path: str | os.PathLike, map_location: str = "cpu") -> torch.jit.ScriptModule:
    import torch

    with quiet_torch():
        return torch.jit.load(str(path), map_location=map_location)


@contextlib.contextmanager
def jit_inference() -> Iterator[None]:
    """Inference mode with TorchScript's profiling executor switched off.

    The profiling executor re-profiles and re-optimises for every new input shape
    (about 1 s per shape for a small U-Net on CPU) to fuse element-wise ops, and a frozen
    U-Net has almost none left (BatchNorm is folded, ReLU is in place), so it only costs.
    """
    import torch

    with torch.inference_mode(), torch.jit.optimized_execution(False):
        yield


def load_weights(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers (no pickled code)."""
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def onnx_export(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    input_name: str,
    output_name: str,
    dynamic_axes: Sequence[int],
    opset: int,
) -> str:
    """Export ``module`` to a single ONNX file with the given axes dynamic.

    The TorchScript-based exporter (``dynamo=False``) is tried first: in torch 2.13 it
    gives the same dynamic-shape results as the ``torch.export`` one for every U-Net
    variant, runs as fast in ONNX Runtime, and exports 20-50x faster. The
    ``torch.export`` exporter is the fallback for torch versions that drop it.

    Returns
    -------
    str
        ``"torchscript"`` or ``"dynamo"``: which exporter wrote the file.
    """
    import torch

    names = {a: ("batch" if a == 0 else f"s{a - 2}") for a in dynamic_axes}
    what = (module, (example,), str(path))  # the same network, input and file for both
    common = {"input_names": [input_name], "output_names": [output_name]}
    errors: list[str] = []
    with quiet_torch():
        try:
            torch.onnx.export(
                *what,
                dynamo=False,
                opset_version=opset,
                dynamic_axes={input_name: names, output_name: names},
                do_constant_folding=True,
                **common,
            )
            return "torchscript"
        except Exception as exc:  # removed or broken in this torch: try the other one
            errors.append(f"dynamo=False: {exc}")
            log.info("TorchScript-based ONNX export failed (%s); trying dynamo=True", exc)
        dims = {
            a: (torch.export.Dim("batch") if a == 0 else torch.export.Dim.DYNAMIC)
            for a in dynamic_axes
        }
        try:
            torch.onnx.export(
                *what,
                dynamo=True,
                opset_version=max(opset, 18),
                dynamic_shapes=(dims,),
                external_data=False,
                verbose=False,
                **common,
            )
            return "dynamo"
        except Exception as exc:
            errors.append(f"dynamo=True: {exc}")
    raise RuntimeError("; ".join(errors))
