"""`lmlab` console commands."""

from __future__ import annotations

import argparse
import sys

from lmlab.errors import LmlabError


def _export(args: argparse.Namespace) -> None:
    from lmlab.export import export_adapter, export_checkpoint

    if args.adapter_only:
        path = export_adapter(args.checkpoint, args.out)
        print(f"exported the trained tensors of {args.checkpoint} -> {path} "
              f"({path.stat().st_size:,} bytes); load them with peft_from={args.out}")
        return
    path = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path}")


def _tokenizers(args: argparse.Namespace) -> None:
    import datetime
    import os
    from pathlib import Path

    from lmlab.tokenizers.lab import compare, default_spec_names, parse_spec, read_text_sets
    from lmlab.tokenizers.lab_output import plot, report_markdown, write_csv

    names = args.tokenizer or default_spec_names()
    specs = [parse_spec(name, args.set) for name in names]
    sets = read_text_sets(args.texts)
    train = read_text_sets(args.train) if args.train else None
    reference = args.reference
    if reference is None:  # FLORES-style sets: compare every language with English
        reference = "eng_Latn" if any(s.name == "eng_Latn" for s in sets) else None
    elif reference == "none":
        reference = None
    cache_dir = args.cache_dir or os.environ.get("LMLAB_CACHE", ".cache/lmlab")
    rows = compare(
        specs, sets, train, args.train_chars, reference, cache_dir,
        progress=lambda label: print(f"tokenizer: {label}", file=sys.stderr, flush=True),
    )
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out or Path("outputs") / "tokenizers" / stamp)
    out.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(rows, reference)
    (out / "tokenizers.md").write_text(markdown, encoding="utf-8")
    write_csv(rows, out / "tokenizers.csv")
    plot(rows, out / "tokenizers.png", reference)
    print(markdown)
    print(f"wrote {out / 'tokenizers.md'}, {out / 'tokenizers.csv'}, {out / 'tokenizers.png'}")


def _add_tokenizers_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser(
        "tokenizers",
        help="compare tokenizers on text sets: fertility, premium, bytes/token, ... as md/csv/png",
        description="Train (or load) each tokenizer and measure it on every text set. Example: "
        "lmlab tokenizers ../shared/data/flores200_sample/devtest "
        "--train ../shared/data/flores200_sample/dev -t bpe -t unigram -t bytelevel_bpe "
        "--set vocab_size=8000",
    )
    lab.add_argument("texts", nargs="+", help="text files or folders (one set per file)")
    lab.add_argument(
        "-t", "--tokenizer", action="append",
        help="a conf/tokenizer option or kind plus overrides, e.g. 'bpe vocab_size=8000' "
        "(repeatable; default: every option in conf/tokenizer except hf)",
    )
    lab.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override for every tokenizer, e.g. --set vocab_size=4000 (repeatable)",
    )
    lab.add_argument(
        "--train", nargs="+", help="training text files or folders (default: the texts measured)"
    )
    lab.add_argument(
        "--train-chars", type=int, default=2_000_000,
        help="characters of training text, shared equally among the training files",
    )
    lab.add_argument(
        "--reference", help="set the premium is relative to (default eng_Latn if present; 'none')"
    )
    lab.add_argument("--out", help="output folder (default outputs/tokenizers/<date>_<time>)")
    lab.add_argument("--cache-dir", help="tokenizer cache (default $LMLAB_CACHE or .cache/lmlab)")
    lab.set_defaults(func=_tokenizers)


def _report(args: argparse.Namespace) -> None:
    from lmlab.report import make_report

    out = make_report(args.directory, args.out, args.metric)
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, report.csv and plots")


def _describe(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lmlab.describe import describe, format_description
    from lmlab.errors import ConfigError
    from lmlab.models import ModelConfig

    conf = Path(args.config_dir).resolve()
    if not (conf / "train.yaml").is_file():
        raise ConfigError("--config-dir", str(conf), reason="no train.yaml there (run from the lmlab checkout)")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    tok = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    # Without training the tokenizer the vocabulary is known exactly only for bytes; otherwise
    # the configured size is the upper bound the tokenizer may reach.
    vocab = model.vocab_size or (262 if tok.get("kind") == "byte" else int(tok.get("vocab_size") or 0))
    seq_len = cfg.data.get("seq_len") or model.max_seq_len
    print(format_description(describe(model, vocab_size=vocab, seq_len=seq_len)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmlab", description="lmlab command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="merge a run's adapters into its backbone and write it out "
                            "(or, with --adapter-only, only the tensors it trained)")
    export.add_argument("checkpoint", help="an lmlab checkpoint, e.g. outputs/runs/<run>/checkpoints/last.ckpt, "
                        "or a run directory (its last.ckpt)")
    export.add_argument("out", help="output directory (model.ckpt, config.json, tokenizer/; or "
                        "adapter.safetensors, adapter_config.json)")
    export.add_argument("--adapter-only", action="store_true",
                        help="write only the trained tensors (adapters, biases, heads) + the PEFT config; "
                        "load them onto the base with init_from=<base> peft_from=<out>")
    export.set_defaults(func=_export)
    _add_tokenizers_parser(sub)
    report = sub.add_parser("report", help="a run or sweep directory as a table (md + csv) and plots (png)")
    report.add_argument("directory", help="a run directory or a multirun directory (outputs/multirun/<sweep name>_<hash>)")
    report.add_argument("--out", default=None, help="output folder (default: <directory>/report)")
    report.add_argument("--metric", default=None, help="metric to plot against each swept setting (default val/loss)")
    report.set_defaults(func=_report)
    desc = sub.add_parser("describe", help="parameters, FLOPs/token, KV-cache bytes and layer plan of a config")
    desc.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (e.g. model=gqa model.n_layers=8)")
    desc.add_argument("--config-dir", default="conf", help="lmlab's conf/ folder (default ./conf)")
    desc.set_defaults(func=_describe)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LmlabError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
