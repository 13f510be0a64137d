"""The `es-jax` commands, one module each, the layer above `analysis`, `evaluate` and `train`.

Every command has one shape: `es-jax COMMAND --config FILE[:variant] --workdir DIR
[--config.key=value ...]` (`command_line.parse`); its module exposes `run(config, workdir)`,
built from module-level functions, and a `main(argv)` that only parses and calls `run`.
"""
