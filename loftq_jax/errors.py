"""The exception raised for invalid user input: bad settings, tensors or checkpoint files."""


class InputError(ValueError):
    """Invalid input from the user; the command line prints its message without a traceback."""
