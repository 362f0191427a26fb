"""The `dpo-fast` command line (`main`): one module per subcommand, each with `add_arguments(parser)` and
`run(args)`, and the flags and error style they share (`flags`, `sources`). The top layer: may import any."""
