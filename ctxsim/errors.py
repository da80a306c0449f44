"""User-facing errors: one line that says what went wrong and what to do; the CLI prints them and exits 2 (1 for
ParityFailed, a verdict)."""

__all__ = ["ArtifactError", "ConfigError", "CtxsimError", "DataError", "FingerprintMismatch", "ImageRefused",
           "ImageTooLarge", "MissingDependency", "NonFiniteEmbedding", "ParityFailed", "TrainingDiverged"]


class CtxsimError(Exception):
    """Base class of every error a user can fix by changing input, options or installed packages."""


class ConfigError(CtxsimError, ValueError):
    """A bad option, argument or recipe value."""


class DataError(CtxsimError):
    """Unreadable, corrupt or unsuitable data."""


class ImageRefused(DataError):
    """An image outside ctxsim's decoding limits (see ``ctxsim.data.limits``), refused before it is decoded.

    ``limit`` names the limit ("max_aspect_ratio", "max_pixels"), ``maximum`` is its value and ``value`` the image's;
    ``status`` is the HTTP status a server answers with (422: a shape no model input can take)."""

    status = 422

    def __init__(self, detail: str, limit: str, maximum: float, value: float, name: str | None = None) -> None:
        self.detail, self.limit, self.maximum, self.value, self.name = detail, limit, maximum, value, name
        super().__init__(f"image {name} {detail}" if name else f"image {detail}")

    def named(self, name: str) -> "ImageRefused":
        """The same refusal naming the image (itself when it already names one)."""
        return self if self.name else type(self)(self.detail, self.limit, self.maximum, self.value, name)


class ImageTooLarge(ImageRefused):
    """An image with more pixels than the decoding limit allows (HTTP 413)."""

    status = 413


class ArtifactError(CtxsimError):
    """A run folder, model file, engine or index that is missing, damaged or of the wrong kind."""


class FingerprintMismatch(ArtifactError):
    """An index queried through a model other than the one that built it."""


class MissingDependency(CtxsimError, ImportError):
    """An optional dependency is not installed; the message says how to install it."""


class TrainingDiverged(CtxsimError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ParityFailed(CtxsimError, AssertionError):
    """An exported artifact does not reproduce the reference model's retrieval within thresholds (a verdict on
    usable input: the CLI exits 1)."""


class NonFiniteEmbedding(ArtifactError):
    """A model returned NaN or infinite embeddings (damaged weights, or a precision that overflows on this input).

    ``embeddings`` holds the batch's output and ``rows`` the positions of the non-finite rows, so that a caller that
    serves many requests at once (the HTTP batcher) can fail only the affected ones."""

    def __init__(self, message: str, embeddings=None, rows=()):
        super().__init__(message)
        self.embeddings = embeddings
        self.rows = list(rows)
