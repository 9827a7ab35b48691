"""The errors multiar raises on purpose, at the bottom of the house so every layer can raise them."""


class ConfigError(ValueError):
    """A bad argument or config value; the CLI prints it as one line and exits with code 2."""


def first_line(err: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    return (str(err).strip() or type(err).__name__).splitlines()[0]
