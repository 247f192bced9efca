"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm is an affine map per channel; folded into the preceding
convolution's weights and bias it costs nothing at run time (one pass over the
activations less per layer, which is what a memory-bound network spends its time on).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``module`` (in eval mode) with every convolution directly followed by a
    BatchNorm inside an ``nn.Sequential`` replaced by one convolution (the BatchNorm by
    ``nn.Identity``); and the number folded. ``module`` itself is not changed."""
    folded = copy.deepcopy(module).eval()
    count = 0
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, norm = seq._modules[a], seq._modules[b]
            if not isinstance(norm, _NORMS) or not norm.track_running_stats:
                continue
            if isinstance(conv, _CONVS + _TRANSPOSED) and conv.out_channels == norm.num_features:
                seq._modules[a] = fuse_conv_bn_eval(
                    conv, norm, transpose=isinstance(conv, _TRANSPOSED)
                )
                seq._modules[b] = nn.Identity()
                count += 1
    return folded, count
