"""Errors raised while reading drafter checkpoints. Every message names the file and the field."""


class DrafterLoadError(ValueError):
    """A drafter checkpoint cannot be used: malformed, incomplete, or mismatched with the target."""

    def __init__(self, path: str, field: str, problem: str):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


class DrafterConfigError(DrafterLoadError):
    """config.json is missing a key, has a wrong type, or an unsupported value."""


class DrafterWeightsError(DrafterLoadError):
    """A tensor is missing, unexpected, mis-shaped or of a wrong dtype."""


class TargetMismatchError(DrafterLoadError):
    """The drafter was built for a different target (hidden size, vocab, layer count, ...)."""
