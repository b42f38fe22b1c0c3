"""One script per paper figure or table; `python -m experiments.run_all` runs them all.

See experiments/README.md for the map figure -> script -> CSV -> PNG.
"""
