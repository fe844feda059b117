"""Subcommands of the ``deepforcing`` command line; each module has ``add_arguments(parser)`` and ``run(args)``."""
