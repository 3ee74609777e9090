"""One module per ``msxai`` subcommand; see ``msxai.cli``."""
