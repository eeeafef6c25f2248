"""``python -m dbrx_aot``: the CLI, for launchers that run a module (``torchrun -m dbrx_aot ...``)."""

from dbrx_aot.cli import cli

cli(prog_name="dbrx-aot")
