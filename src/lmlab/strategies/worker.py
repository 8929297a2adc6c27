"""A non-zero rank of a multi-process run: `python -m lmlab.strategies.worker <rank config>`
(started by `RunConfigLauncher` with LOCAL_RANK etc. in the environment), or
`python -m lmlab.strategies.worker --warm <main pid>`, started with the job and handed its
rank's config on stdin (`lmlab.strategies.warm_ranks`)."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from lmlab.strategies.warm_ranks import WARM_FLAG, wait_for_rank


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == WARM_FLAG:
        config_path = wait_for_rank(int(argv[1]) if len(argv) > 1 else None)
        if config_path is None:  # released: the job needs no rank from this process
            return
    else:
        config_path = argv[0]
    from lmlab.train import run

    run(OmegaConf.load(config_path))


if __name__ == "__main__":
    main()
