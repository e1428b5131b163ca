"""The domain errors. Each says what was expected, what was found and where; the CLI prints it on one line
and exits non-zero."""


class SemidError(Exception):
    """Base class: an error the user can act on (bad input, bad params), not a bug."""


class ParamsError(SemidError):
    """params.yaml is missing a key, has an unknown key, or holds a value of the wrong kind."""


class DataError(SemidError):
    """An input file is missing, unreadable, or does not follow its data contract."""


class ValidationFailed(SemidError):
    """The validation gate rejected the data; the message lists the failed checks."""


class CodebookVersionMismatch(SemidError):
    """SemIDs of one codebook version were asked for where another version is stored or expected."""


class IncompatibleCheckpoint(DataError):
    """A checkpoint whose weights do not fit the model the current code builds from its config (saved by an
    earlier version of the model code)."""
