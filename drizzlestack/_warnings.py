"""Warning and error classes of drizzlestack (kept in one place so tests can filter them)."""


class DrizzlestackWarning(UserWarning):
    """A condition the user should know about; the run goes on."""


class DrizzlestackError(Exception):
    """A user-facing error: bad input, a bad parameter or a store in the wrong state.

    The message always names the file or parameter and the reason.
    """


class StoreError(DrizzlestackError):
    """The path is not a drizzlestack store, or the store is in a state the step cannot use."""
