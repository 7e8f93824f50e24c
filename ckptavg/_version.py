"""The version, declared once: pyproject.toml reads it, ``ckptavg --version`` prints it, CHANGELOG.md's
newest release heading must match it (tests/test_packaging.py)."""

__version__ = "0.3.0"
