"""``python -m langseg`` runs the CLI."""

from langseg.cli import main

main()
