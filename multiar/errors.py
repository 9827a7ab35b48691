"""The errors multiar raises on purpose, at the bottom of the house so every layer can raise them."""


class ConfigError(ValueError):
    """A bad argument or config value; the CLI prints it as one line and exits with code 2."""
