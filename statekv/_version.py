"""statekv's release (also in pyproject.toml): recorded in every manifest; a module of its own so the store can
read it without importing the package's API facade."""

__version__ = "0.3.0"
