"""Why a worker refuses a request it was sent: the error code it answers with, and for a
bad_request the request field at fault (the HTTP front names it in its error)."""


class TooLong(Exception):
    """A request's context does not fit the worker's: error code too_long (a ValueError
    refusing a request is bad_request)."""


class Refused(ValueError):
    """A request this worker cannot run as asked (bad_request), because of one field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Unfit(ValueError):
    """A load setting (a key of the model's config table) that this model cannot run
    with: the load fails, naming it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
