"""The `vit-vq` command line. Each subcommand lives in its own module."""
