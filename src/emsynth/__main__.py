"""`python -m emsynth ...` runs the `emsynth` command (same as the console script)."""

from emsynth.cli import main

main()
