"""The installed compressed-tensors for the interop tests, or a skip that says why (the suite installs nothing)."""

import pytest


def compressed_tensors():
    """compressed-tensors 0.12-0.14 (the versions with the sparse compressors acdc's exports use), or a skip."""
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed "
                             "(pip install -e '.[compressed-tensors]' to run the interop tests)")
    major_minor = tuple(int(part) for part in ct.__version__.split(".")[:2])
    if not (0, 12) <= major_minor < (0, 15):
        pytest.skip(f"compressed-tensors {ct.__version__}: only 0.12-0.14 have the sparse compressors these files use")
    return ct
