"""Reading and writing images.

Read path, in the order data flows: ``formats`` (which files) → ``tiff`` / ``zarr_source``
(metadata; ``meta``, ``axes``) → ``lazy`` (a level, lazily) → ``sources`` (an opened
image) → ``model_input`` (what the model reads; ``model_view``, ``channels``,
``resample``). Beside it: ``discover`` (inputs), ``masks`` (user masks); write path:
``sink`` (images), ``ngff`` (metadata), ``labels`` (tissue labels). See ARCHITECTURE.md.
"""
