"""Run by Python at the start of every process whose PYTHONPATH holds this folder (conftest puts it there for the
processes the tests start: ``acdc train`` in a subprocess, torchrun's ranks, multiprocessing's spawned workers):
registers the test models (acdc_test_models) once acdc's models package is imported, after its built-in models
(the order a listing shows them in is the one the pytest process has).

The registration waits for that import: importing acdc (and torch, seconds) at the start of every Python process,
most of which never build a model, would slow down every one of them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_MODELS = "acdc_cli.models"


class _RegisterAfterModels(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of acdc's models package, so the test models register right after
    the package has run."""

    def find_spec(self, name, path, target=None):
        if name != _MODELS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            importing = sys.modules.get("acdc_test_models")
            if importing is not None and not hasattr(importing, "register_test_models"):
                return  # acdc_test_models itself is importing acdc (a pytest run's conftest): its caller registers
            import acdc_test_models

            acdc_test_models.register_test_models()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _RegisterAfterModels())
