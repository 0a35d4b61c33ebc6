"""The package version, in a module of its own so that anything (data.prepare's manifest, the CLI's
--version) can read it without importing the package root's public API."""

__version__ = "0.1.0"
