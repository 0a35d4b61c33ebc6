"""The one exception type that means "the user can fix this".

Everything the CLI catches and prints as a single line (exit code 2) derives from UserError; any other
exception is a bug in gptforge and keeps its traceback so it can be reported.
"""


class UserError(Exception):
    """Bad input (a path, an option, a file's contents) described in one line that says what to do."""
