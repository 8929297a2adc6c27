"""Every mistake is named before compute: a ConfigError/DataError naming the field (or file),
and no checkpoint or run record left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab import ConfigError, DataError
from lmlab.train import run
from tests.conftest import SHARED_DATA

M30K = SHARED_DATA / "multi30k_de_en"

# (overrides, the field the error must name; "data:<path part>" for a DataError naming a file)
CASES = [
    # model shapes and choices
    (["model.n_heads=3"], "model.n_heads"),
    (["model=gqa", "model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.d_model=-8"], "model.d_model"),
    (["model.d_model=abc"], "model.d_model"),
    (["model.d_model=true"], "model.d_model"),
    (["model.n_layers=0"], "model.n_layers"),
    (["model.max_seq_len=0"], "model.max_seq_len"),
    (["model.dropout=1.5"], "model.dropout"),
    (["model.position=spiral"], "model.position"),
    (["model.norm=batchnorm"], "model.norm"),
    (["model.ffn=glu"], "model.ffn"),
    (["model.attn_impl=flash3"], "model.attn_impl"),
    (["model.family=rnn"], "model.family"),
    (["+model.widht=3"], "model.widht"),
    (["model=moe", "model.top_k=9"], "model.top_k"),
    (["model=hybrid", "model.n_layers=4", "model.layer_pattern=MXMA"], "model.layer_pattern"),
    (["model.sliding_window=0"], "model.sliding_window"),
    (["model=gqa", "model.rope_scaling=dynamic"], "model.rope_scaling"),
    (["model.rope_scaling=linear"], "model.rope_scaling"),  # without position=rope
    (["model=bert", "task=mlm", "data=text", "tokenizer=char", "model.norm_position=middle"], "model.norm_position"),
    (["model=t5", "task=seq2seq", "model.relative_buckets=0"], "model.relative_buckets"),
    (["model.hf_path=/nonexistent/model"], "model.hf_path"),
    (["model.activation_checkpointing=sometimes"], "model.activation_checkpointing"),
    (["model.compile=sometimes"], "model.compile"),
    (["model.compile=true", "model.compile_mode=fastest"], "model.compile_mode"),
    (["model.position=learned", "data=text", "tokenizer=char", "data.seq_len=128", "model.max_seq_len=64"], "data.seq_len"),
    # tasks vs families vs data
    (["task.name=translate"], "task.name"),
    (["task=mlm"], "task"),
    (["task=seq2seq"], "task"),
    (["model=bert"], "task"),
    (["model=bert", "task=classify"], "data"),
    (["+task.beam=4"], "task.beam"),
    # PEFT
    (["peft=lora", "peft.target_modules=[query]"], "peft.target_modules"),
    (["peft=lora", "peft.r=0"], "peft.r"),
    (["peft=lora", "peft.dropout=1.0"], "peft.dropout"),
    (["peft=lora", "peft.bias=some"], "peft.bias"),
    (["peft=lora", "+peft.rank=4"], "peft.rank"),
    (["peft.method=prefix-xl"], "peft.method"),
    (["peft=frozen"], "peft"),  # clm has no head: nothing would train
    (["peft=ia3", "peft.feedforward_modules=[up_proj]"], "peft.feedforward_modules"),
    # compression and distillation ({teacher}: a decoder checkpoint, the `teacher_ckpt` fixture)
    (["compress.method=zip"], "compress.method"),
    (["compress=prune", "compress.sparsity=1.0"], "compress.sparsity"),
    (["compress=prune", "compress.sparsity=-0.5"], "compress.sparsity"),
    (["compress=prune", "compress.scope=row"], "compress.scope"),
    (["compress=prune", "compress.kind=structured", "compress.heads=4"], "compress.heads"),  # all 4 heads
    (["compress=prune", "compress.kind=structured", "model=gqa", "compress.heads=1"], "compress.heads"),
    (["compress=prune", "compress.schedule=gradual", "compress.end_step=100"], "compress.end_step"),
    (["compress=prune", "compress.finetune_steps=2", "peft=lora"], "compress.finetune_steps"),
    (["compress=prune", "peft=qlora"], "compress"),  # the base is already 4-bit
    (["compress=quantize", "compress.dtype=fp8"], "compress.dtype"),
    (["compress=quantize", "+compress.bits=4"], "compress.bits"),
    (["task=distill"], "teacher"),
    (["task=distill", "teacher=/nonexistent/teacher.ckpt"], "teacher"),
    (["teacher={teacher}"], "teacher"),  # task=clm has no teacher
    (["task=distill", "teacher={teacher}", "model=transformer"], "teacher"),  # another family
    (["task=distill", "teacher={teacher}", "task.alpha=2"], "task.alpha"),
    (["peft=qlora", "peft.quant_type=int4"], "peft.quant_type"),
    (["peft=qlora", "peft.compute_dtype=float8"], "peft.compute_dtype"),
    (["peft=qlora", "peft.compute_dtype=float16"], "peft.compute_dtype"),  # CPU-only machine
    (["peft=qlora", "peft.target_modules=[lm_head]"], "peft.target_modules"),  # stays full precision
    (["peft=qlora", "peft.target_modules=[attn]"], "peft.target_modules"),  # a module, not a Linear
    (["peft=qlora", "peft.target_modules=[all,q_proj]"], "peft.target_modules"),
    (["peft=adapter", "peft.placement=middle"], "peft.placement"),
    (["peft=adapter", "peft.bottleneck=0"], "peft.bottleneck"),
    (["peft=adapter", "peft.activation=swish7"], "peft.activation"),
    (["peft_from=/nonexistent/adapter"], "peft_from"),
    (["peft=prefix", "model=mamba"], "peft.method"),  # no attention layer to put prefixes in
    (["peft=prefix", "peft.n_virtual_tokens=0"], "peft.n_virtual_tokens"),
    (["peft=prefix", "peft.hidden_size=64"], "peft.hidden_size"),  # only with reparameterize
    (["peft=prompt", "peft.n_virtual_tokens=250"], "peft.n_virtual_tokens"),  # + data > max_seq_len
    (["peft=prompt", "peft.init=text"], "peft.init_text"),
    (["peft=prompt", "peft.init=zeros"], "peft.init"),
    # data
    (["data.tasks=[multiply]"], "data.tasks"),
    (["data.tasks=[]"], "data.tasks"),
    (["data.n_train=0"], "data.n_train"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.low=50", "data.high=10"], "data.high"),
    (["data.high=2", "data.n_numbers=1"], "data.n_train"),
    (["+data.colour=red"], "data.colour"),
    (["data.limit_train_items=0"], "data.limit_train_items"),
    (["data=text", "tokenizer=char", "data.path=/nonexistent/corpus.txt"], "data:/nonexistent/corpus.txt"),
    (["data=text", "tokenizer=char", "data.seq_len=0"], "data.seq_len"),
    (["data=text", "tokenizer=char", "data.val_fraction=0.9"], "data.val_fraction"),
    (["data=text", "tokenizer=char", "data.eval_seq_lens=[0]"], "data.eval_seq_lens"),
    (["data=classification", "task=classify", "data.path=/nonexistent/labels.tsv"], "data:/nonexistent/labels.tsv"),
    (["data=parallel", "task=seq2seq", "model=transformer", f"data.train_src_path={M30K / 'val.de.gz'}"], "data:val.de.gz"),
    # tokenizers
    (["tokenizer.kind=morfessor"], "tokenizer.kind"),
    (["tokenizer=bpe", "tokenizer.vocab_size=10"], "tokenizer.vocab_size"),
    (["+tokenizer.foo=1"], "tokenizer.foo"),
    (["tokenizer=hf"], "tokenizer.path"),
    (["tokenizer.digits=weird"], "tokenizer.digits"),
    (["tokenizer=char", "+tokenizer.dropout=0.1"], "tokenizer.dropout"),
    (["data=text", "tokenizer=bpe", "tokenizer.vocab_size=300", "tokenizer.dropout=0.1"], "tokenizer.dropout"),
    # optimisation, trainer, callbacks, loggers
    (["+optimizer.momentum2=0.9"], "optimizer.momentum2"),
    (["scheduler.warmup_steps=-1"], "scheduler.warmup_steps"),
    (["scheduler.min_lr_ratio=2"], "scheduler.min_lr_ratio"),
    (["optimizer=lamb", "optimizer.lr=-1"], "optimizer.lr"),
    (["optimizer=adafactor", "optimizer.eps=[0.001]"], "optimizer.eps"),
    (["optimizer=adamw8bit", "+optimizer.weight_decay=0.1"], "optimizer.weight_decay"),
    (["+trainer.max_step=3"], "trainer.max_step"),
    (["trainer.precision=fp7"], "trainer"),
    (["trainer.accelerator=gpu"], "trainer"),
    (["+trainer.strategy=fsdp"], "trainer"),  # Lightning's FSDP1 refuses CPU: points to trainer=fsdp
    # distributed strategies (conf/trainer/{ddp,fsdp,deepspeed_*}.yaml)
    (["trainer=gpu"], "trainer.accelerator"),
    (["trainer=ddp", "trainer.precision=16-mixed"], "trainer.precision"),
    (["trainer=ddp", "trainer.devices=64"], "trainer.devices"),
    (["trainer=fsdp", "trainer.devices=1"], "trainer.devices"),
    (["trainer=fsdp", "trainer.strategy.param_dtype=float8"], "trainer.strategy.param_dtype"),
    (["trainer=fsdp", "peft=qlora"], "peft"),
    (["trainer=deepspeed_zero3", "peft=qlora"], "peft"),
    (["trainer=deepspeed_zero2", "trainer.strategy.config.zero_optimization.stage=5"],
     "trainer.strategy.config.zero_optimization.stage"),
    (["trainer=deepspeed_zero2", "+trainer.strategy.config.zero_optimization.offload_param={device:cpu}"],
     "trainer.strategy.config.zero_optimization.offload_param"),
    (["trainer=deepspeed_zero2", "trainer.strategy.config.zero_optimization.reduce_bucket_size=-1"],
     "trainer.strategy.config.zero_optimization.reduce_bucket_size"),
    (["trainer=deepspeed_zero2", "+trainer.strategy.config.zero_optimization.bucket=1"],
     "trainer.strategy.config.zero_optimization.bucket"),
    (["trainer=deepspeed_zero2", "+trainer.strategy.config.train_batch_size=7"], "trainer.strategy.config.train_batch_size"),
    (["trainer=deepspeed_zero2", "+trainer.strategy.config.gradient_accumulation_steps=2"],
     "trainer.strategy.config.gradient_accumulation_steps"),
    (["trainer=deepspeed_zero1", "+trainer.gradient_clip_algorithm=value"], "trainer.gradient_clip_algorithm"),
    (["callbacks.nonfinite.policy=ignore"], "callbacks.nonfinite"),
    (["callbacks.nonfinite.check_every_n_steps=0"], "callbacks.nonfinite.check_every_n_steps"),
    (["callbacks.nonfinite.policy=skip", "callbacks.nonfinite.check_every_n_steps=5", "optimizer.fused=false"],
     "callbacks.nonfinite.check_every_n_steps"),
    (["callbacks.throughput.peak_tflops=-1"], "callbacks.throughput.peak_tflops"),
    (["callbacks.last_checkpoint.every_n_steps=0"], "callbacks.last_checkpoint"),
    (["logger=wandb", "logger.wandb.mode=sometimes"], "logger.wandb.mode"),
    # runs and checkpoints
    (["seed=-1"], "seed"),
    (["host_memory=forever"], "host_memory"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path"),
    (["ckpt_path=last"], "ckpt_path"),
    (["init_from=/nonexistent/last.ckpt"], "init_from"),
    (["init_from=hf:/nonexistent/model"], "init_from"),
]


def test_there_are_at_least_fifty_cases():
    assert len(CASES) >= 50


@pytest.mark.slow
@pytest.mark.parametrize("overrides,field", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_mistake_is_named_before_compute(make_cfg, overrides, field, request):
    if any("{teacher}" in o for o in overrides):
        teacher = str(request.getfixturevalue("teacher_ckpt"))
        overrides = [o.replace("{teacher}", teacher) for o in overrides]
    cfg = make_cfg(overrides)
    with pytest.raises((ConfigError, DataError)) as info:
        run(cfg)
    err = info.value
    if field.startswith("data:"):
        assert isinstance(err, DataError), err
        assert field[len("data:"):] in err.path
    else:
        assert isinstance(err, ConfigError), err
        assert err.field == field or err.field.startswith(field + "."), f"{err.field!r}: {err}"
        assert field in str(err)
    out = Path(cfg.paths.output_dir)
    assert not (out / "metrics.json").exists(), "a failed config left a run record"
    assert not (out / "checkpoints").exists(), "a failed config left checkpoints"
