"""Recipes: the drivers that wire the components into a run, each read top to bottom.

- `ladder`: train every rung of a recipe and measure them in one run (`system15 demo`, `bench`).
- `ablation`: retrain one rung once per variant of an ablation file (`system15 ablate`).
"""
