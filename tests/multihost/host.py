"""One host of a multi-process run on this machine, as `launcher` starts it:

    python host.py ADDRESS PROCESSES INDEX COMMAND [ARGS ...]

joins the other hosts (`jax.distributed.initialize` with the coordinator at ADDRESS, CPU
collectives through gloo), then runs `es-jax COMMAND ARGS`, as every host of a pod runs the same
command. With PROCESSES 1 it runs alone, without jax.distributed.
"""

import sys

import jax


def main(argv: list[str]) -> None:
    """Joins the hosts and runs the command."""
    address, processes, index, *command = argv
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if int(processes) > 1:
        jax.distributed.initialize(address, num_processes=int(processes), process_id=int(index))
    from es_jax import cli

    cli.main(command)


if __name__ == "__main__":
    main(sys.argv[1:])
