"""Model registry. Importing this package registers every model family."""

from acdc_cli.models import mobilenet, resnet50, resnet_cifar, small, wrn  # noqa: F401  (registers)
from acdc_cli.models.registry import ModelEntry, create, entries, lookup, register

__all__ = ["ModelEntry", "create", "entries", "lookup", "register"]
