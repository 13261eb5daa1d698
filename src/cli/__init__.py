"""Command-line commands: one module per command, one table (``src.cli.main.COMMANDS``)."""
