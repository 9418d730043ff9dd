"""Command-line interfaces: the `pygirder` command and the service-CLI helper."""
