"""pipeline: segment very large biomedical images with a U-Net, tile by tile, into OME-Zarr."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unet-pipeline")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
