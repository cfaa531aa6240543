"""The one exception type phinano raises for bad input: a model folder, a checkpoint, a prompt.

The CLI turns it into a single line on stderr and a non-zero exit; library users can catch it.
"""


class PhinanoError(Exception):
    """A clear, user-facing problem (missing file, malformed checkpoint, prompt too long, ...)."""
