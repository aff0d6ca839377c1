"""One module per `edgecv` subcommand. Each exposes `register(subparsers)`; heavy imports stay inside the
handler so `edgecv --help` is instant."""
