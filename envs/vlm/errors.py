"""Errors with messages a user can act on, raised before bad input reaches torch."""


class KnobError(ValueError):
    """A tier, top_k or blocks value the model's preset does not offer."""


class InputError(ValueError):
    """An image or question that cannot be turned into a request."""


class CheckpointError(ValueError):
    """A model directory or checkpoint that is missing files or does not fit the model."""
