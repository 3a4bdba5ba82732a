"""The one exception type vitexp raises for bad input.

Its message is a single line that names the setting or file to change. The command-line
entry points print it without a traceback and exit with status 2.
"""


class ConfigError(ValueError):
    """A setting, file or input that cannot work; the message says what to change."""
