"""Command-line interface. Each subcommand lives in its own module (see ``main.COMMANDS``)."""
