"""Distill a teacher into a student on text files and save the student with a report: `slimserve distill`.

The trainer is kd_trainer.py. Started by torchrun, it trains data-parallel over GPUs:

    torchrun --nproc_per_node 8 -m slimserve.optimizers.training.distill --teacher T --student-prune '{"mlp_keep": 0.5}' ...
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from slimserve.optimizers.training.gradual_prune import ChannelMasks, GradualPrune
from slimserve.optimizers.training.gradual_sparse import GradualSparse, WeightMasks
from slimserve.optimizers.training.kd_trainer import DistillArgs, agreement, distill, save_student
from slimserve.optimizers.models import resolve_source
from slimserve.optimizers.quality import HeldOut, model_perplexity
from slimserve.optimizers.methods.structured import StructuredPrune
from slimserve.optimizers.training.student_init import init_student


def add_arguments(p) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint (local HF folder, or `default`)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--student", help="student checkpoint to start from (same tokenizer)")
    g.add_argument("--student-prune", metavar="JSON", help='prune the teacher into the student first, e.g. \'{"mlp_keep": 0.5, "layers_keep": 0.8}\'')
    g.add_argument("--student-config", metavar="JSON", help='teacher config overrides, randomly initialised, e.g. \'{"num_hidden_layers": 6}\'')
    g.add_argument("--gradual-prune", metavar="JSON", help='start from the teacher itself and prune its MLP channels over the '
                   'training on a cubic schedule (the `gradual_prune` method), e.g. \'{"mlp_keep": 0.5, "end": 0.7}\'')
    g.add_argument("--gradual-sparse", metavar="JSON", help="start from the teacher itself and zero its weights over the "
                   "training in a 2:4 (or unstructured) pattern (the `gradual_sparse` method), e.g. '{\"pattern\": \"2:4\"}'")
    g.add_argument("--qat", metavar="JSON", help="train the teacher itself through a fake quantizer, KD from its unquantized "
                   "self, and write the W4A16 (or W8A16) checkpoint vLLM serves (the `qat` method), e.g. '{\"bits\": 4}'")
    g.add_argument("--qlora", metavar="JSON", help="the same with low-rank adapters on the frozen weights, merged before the "
                   "export (the `qlora` method), e.g. '{\"rank\": 16}'")
    p.add_argument("--out", required=True, help="folder for the trained student (checkpoints in OUT/checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--eval-text", help="held-out text: perplexity of teacher and student before/after, and agreement")
    for name, field in DistillArgs.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation in (bool, bool | None):
            p.add_argument(flag, action="store_true", default=None, help=field.description)
            if name == "bf16":
                p.add_argument("--no-bf16", dest="bf16", action="store_false", help="no autocast (fp32)")
        else:
            typ = {int: int, float: float}.get(field.annotation, str)
            p.add_argument(flag, type=typ, default=field.default, help=f"{field.description} (default {field.default})")


def run_cli(a) -> int:
    if a.qat or a.qlora:
        return train_quantized(a)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = DistillArgs.model_validate({k: getattr(a, k) for k in DistillArgs.model_fields})
    teacher_path = resolve_source(a.teacher)
    out = Path(a.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    # The teacher only runs forward: in the dtype it was saved in (the student trains in fp32).
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype="auto")
    masks = callbacks = weights = None
    if a.gradual_prune:  # the student is the teacher, losing MLP channels as it trains
        spec = GradualPrune.model_validate({**json.loads(a.gradual_prune), "method": "gradual_prune", "train": args.model_dump()})
        student = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
        masks = ChannelMasks(student)
        callbacks = [masks.schedule(spec)]
    elif a.gradual_sparse:  # the student is the teacher, losing weights as it trains
        spec = GradualSparse.model_validate({**json.loads(a.gradual_sparse), "method": "gradual_sparse", "train": args.model_dump()})
        student = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
        weights = WeightMasks(student, spec.pattern)
        callbacks = [weights.schedule(spec)]
    elif a.student:
        student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    else:  # a pruned student is written once, by rank 0, into OUT/student-init
        prune = StructuredPrune.model_validate(json.loads(a.student_prune)) if a.student_prune else None
        config = json.loads(a.student_config) if a.student_config else None
        student = init_student(teacher_path, prune, config, args.seed, out / "student-init", write=rank0)
    report: dict[str, Any] = {"teacher": str(teacher_path), "args": args.model_dump(),
                              "student_parameters": sum(p.numel() for p in student.parameters()),
                              "teacher_parameters": sum(p.numel() for p in teacher.parameters())}
    held = HeldOut(text=a.eval_text, windows=16, seq_len=min(256, args.seq_len)) if a.eval_text else None
    if held and rank0:
        report["perplexity_before"] = round(model_perplexity(student, tokenizer, held), 3)
    report["train"] = distill(teacher, student, tokenizer, args, out / "checkpoints", resume=a.resume, callbacks=callbacks)
    if masks is not None:  # every rank: the last prune is collective under torchrun
        masks.prune_to(spec.final_width(masks.width))
        student = masks.cut(student.cpu())
        report["gradual_prune"] = {"schedule": masks.history, "intermediate_size": [masks.width, spec.final_width(masks.width)]}
        report["student_parameters"] = sum(p.numel() for p in student.parameters())
    if a.gradual_sparse:  # every rank: the last prune syncs statistics under torchrun
        weights.prune_to(spec.sparsity)
        weights.remove_hooks()
        zero = sum(int(z.sum()) for z in weights.zeroed.values())
        report["gradual_sparse"] = {"schedule": weights.history, "pattern": spec.pattern,
                                    "weight_sparsity": round(zero / sum(z.numel() for z in weights.zeroed.values()), 4)}
    if rank0:
        if held:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            teacher.to(dev), student.to(dev)
            report["perplexity_after"] = round(model_perplexity(student, tokenizer, held), 3)
            report["teacher_perplexity"] = round(model_perplexity(teacher, tokenizer, held), 3)
            report["agreement"] = agreement(teacher, student, tokenizer, held)
        save_student(student, tokenizer, out)
        (out / "distill-report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if k != "train"} | {"train": {k: v for k, v in report["train"].items() if k != "history"}}, indent=1))
    return 0


def train_quantized(a) -> int:
    """--qat / --qlora: the registry's method run on the teacher, writing the quantized checkpoint
    into OUT (what a variant with that `optimization:` would serve, without the artifact cache).
    Its training settings: the method's defaults, then the JSON's `train`, then the flags given
    on the command line (those that differ from the flags' defaults)."""
    from slimserve.optimizers.registry import parse

    if a.resume:
        raise SystemExit("--resume: not with --qat / --qlora (they train in one run)")
    method, raw = ("qat", a.qat) if a.qat else ("qlora", a.qlora)
    options = json.loads(raw)
    method_train = parse({"method": method}).train.model_dump()
    given = {k: getattr(a, k) for k, f in DistillArgs.model_fields.items() if getattr(a, k) != f.default}
    options["train"] = {**method_train, **options.get("train", {}), **given}
    if a.eval_text:
        options["eval"] = {**options.get("eval", {}), "text": a.eval_text}
    spec = parse({**options, "method": method})
    teacher = resolve_source(a.teacher)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: not empty (the checkpoint is written there)")
    out.mkdir(parents=True, exist_ok=True)
    report = {"teacher": str(teacher), "method": method, "spec": spec.model_dump(mode="json"), "report": spec.run(teacher, out)}
    (out / "distill-report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="slimserve distill", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
