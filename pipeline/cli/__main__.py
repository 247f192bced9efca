"""``python -m pipeline.cli``: the same commands as the ``pipeline`` console script."""

from pipeline.cli import main

main()
