"""Thin entry points (`python -m jobs.<name>`): argument parsing, no logic."""
