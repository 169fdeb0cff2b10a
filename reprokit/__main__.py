"""`python -m reprokit` is the `reprokit` command."""

from reprokit._cli import main

main(prog_name="reprokit")
