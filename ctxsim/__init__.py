"""ctxsim: contextual-similarity metric learning, from training to deployed retrieval."""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("ctxsim")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

from ctxsim.errors import CtxsimError

__all__ = ["CtxsimError", "__version__"]
