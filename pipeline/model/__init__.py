"""The U-Net and its export to self-describing TorchScript / ONNX model files."""

from pipeline.model.export import export_model, load_weights
from pipeline.model.unet import UNet, margin_of, min_tile_size, valid_output_size

__all__ = [
    "UNet",
    "export_model",
    "load_weights",
    "margin_of",
    "min_tile_size",
    "valid_output_size",
]
