"""The one exception type whose message reaches the user as a single line."""


class ConfigError(ValueError):
    """Bad input: a flag, a file, a config. The entry point prints its message and exits 2."""


class TrainingError(RuntimeError):
    """A run that cannot go on (too many skipped steps, replicas that drifted apart). Exit 1."""
