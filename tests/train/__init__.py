"""Tests of system15.train, one file per module."""
