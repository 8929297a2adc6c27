"""`python train.py [overrides]` — compose a run from conf/ and train it (see README)."""

import hydra
from omegaconf import DictConfig

import lmlab.sweep  # noqa: F401  registers the sweep-directory resolvers before Hydra composes


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lmlab.strategies.warm_ranks import release_warm_ranks, start_warm_ranks

    try:
        start_warm_ranks(cfg)  # a multi-process job's other ranks import while this process does
        from lmlab.train import main as run_main  # imported late so --help stays fast

        return run_main(cfg)
    finally:
        release_warm_ranks()  # any the job did not take


if __name__ == "__main__":
    main()
