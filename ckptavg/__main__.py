"""``python -m ckptavg`` runs the command line."""

from .cli import main

main()
