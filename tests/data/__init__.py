"""Tests of system15.data, one file per module."""
