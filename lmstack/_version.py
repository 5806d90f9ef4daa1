"""The package version, in one place (imported by every floor without reaching ``lmstack.load``)."""

__version__ = "0.1.0"
