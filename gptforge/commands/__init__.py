"""One module per subcommand; each defines `register(subparsers)` and sets `func` to its handler.

Handlers only translate arguments into calls of the Python API and print results.
"""
