"""Tests of system15.recipes, one file per module."""
