"""Errors a user can fix. The CLI prints them without a traceback and exits with their code.

Exit codes: 2 any other Cairn error, 3 data, 4 config, 5 model, 6 training diverged (a NaN or
infinite loss; the last good checkpoint is kept).
"""


class CairnError(Exception):
    """Base of every user-facing error: the message says what is wrong and what was expected."""

    exit_code = 2


class DataError(CairnError):
    """A task source is missing, malformed or inconsistent."""

    exit_code = 3


class ConfigError(CairnError):
    """A config file or command-line option is invalid."""

    exit_code = 4


class ModelError(CairnError):
    """A model spec cannot be resolved or its weights cannot be loaded."""

    exit_code = 5


class TrainingDiverged(CairnError):
    """Training produced a NaN or infinite loss; the message names the step, epoch and loss value."""

    exit_code = 6
