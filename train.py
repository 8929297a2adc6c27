"""`python train.py [overrides]` — compose a run from conf/ and train it (see README)."""

import hydra
from omegaconf import DictConfig

import lmlab.sweep  # noqa: F401  registers the sweep-directory resolvers before Hydra composes


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lmlab.train import main as run_main  # imported late so --help stays fast

    return run_main(cfg)


if __name__ == "__main__":
    main()
