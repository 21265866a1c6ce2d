"""The command layer: the `evalsuite` command, its subcommands' argument parsers, the Python API and
the nightly matrix. Only this layer knows argparse; it builds the run's configuration and calls the app."""
