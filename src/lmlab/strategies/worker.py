"""A non-zero rank of a multi-process run: `python -m lmlab.strategies.worker <rank config>`
(started by `RunConfigLauncher` with LOCAL_RANK etc. in the environment)."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf


def main(argv: list[str] | None = None) -> None:
    from lmlab.train import run

    argv = sys.argv[1:] if argv is None else argv
    run(OmegaConf.load(argv[0]))


if __name__ == "__main__":
    main()
