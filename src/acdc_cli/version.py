"""The version of acdc (read by the build, recorded in every file acdc writes)."""

__version__ = "0.1.0"
