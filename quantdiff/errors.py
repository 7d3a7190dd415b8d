"""Errors a user can act on. Each message names the file, key or setting at fault and what to do."""


class QuantdiffError(Exception):
    """Base class: the workflow prints these without a traceback-worthy surprise."""


class ConfigError(QuantdiffError):
    """The config asks for something that does not exist or does not fit together."""


class MissingWeightsError(QuantdiffError):
    """A model's weights are not on this machine."""


class MissingBackendError(QuantdiffError):
    """A stage needs software (TensorRT) or hardware (a GPU) this machine lacks."""


class UnsupportedDeviceError(QuantdiffError):
    """The GPU exists but cannot run what was asked (FP8 below sm 8.9)."""


class EngineOutputError(QuantdiffError):
    """An engine ran but its output cannot be right (NaN or infinite values)."""


class CorruptArtifactError(QuantdiffError):
    """An input artifact is truncated or unreadable."""

    def __init__(self, path, why):
        super().__init__(f"{path} is corrupt or incomplete ({why}). Delete it and rerun the workflow to rebuild it.")
        self.path = str(path)
