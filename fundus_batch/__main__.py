"""``python -m fundus_batch`` runs the CLI."""

from fundus_batch.cli import main

main()
