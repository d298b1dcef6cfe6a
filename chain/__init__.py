"""The WeCKD algorithm: data, models, distillation losses, link training and the in-process chain.

This package never imports Flower or the server/client packages: everything here runs and is
tested without a federation.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("weckd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
