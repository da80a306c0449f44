"""User-facing errors: one line that says what went wrong and what to do; the CLI prints them and exits 2."""


class CtxsimError(Exception):
    """Base class of every error a user can fix by changing input, options or installed packages."""


class ConfigError(CtxsimError, ValueError):
    """A bad option, argument or recipe value."""


class DataError(CtxsimError):
    """Unreadable, corrupt or unsuitable data."""


class ArtifactError(CtxsimError):
    """A run folder, model file, engine or index that is missing, damaged or of the wrong kind."""


class FingerprintMismatch(ArtifactError):
    """An index queried through a model other than the one that built it."""


class MissingDependency(CtxsimError, ImportError):
    """An optional dependency is not installed; the message says how to install it."""


class TrainingDiverged(CtxsimError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ParityFailed(CtxsimError):
    """An exported artifact does not reproduce the reference model's retrieval within thresholds."""
