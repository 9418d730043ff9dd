"""`python -m pygirder` is the `pygirder` command."""

from .cli.main import main

main()
