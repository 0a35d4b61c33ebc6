"""The one exception type that means "the user can fix this".

Everything the CLI catches and prints as a single line (exit code 2) derives from UserError; any other
exception is a bug in gptforge and keeps its traceback so it can be reported.
"""

EXIT_USER_ERROR = 2  # the code for every one-line user error (argparse uses 2 too)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd program; SIGTERM too, where a command
# handles it as a stop request (train, sft, prepare): one code for "stopped on request, output consistent"


class UserError(Exception):
    """Bad input (a path, an option, a file's contents) described in one line that says what to do."""
