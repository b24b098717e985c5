"""Knowledge distillation, teacher → student, on text files: the engine of KD healing after
structured pruning, of the `student` method's recipe, and of `slimserve distill`.

The loss is Hinton et al. (2015): alpha x T² x KL(teacher/T ‖ student/T) + (1 - alpha) x CE on
the next token. Training is transformers' Trainer: bf16 autocast (`bf16`), gradient
accumulation, checkpoints every `save_steps` and resume, a progress bar whose log lines carry
loss and tokens/s, and data-parallel over GPUs when started by torchrun:

    torchrun --nproc_per_node 8 -m slimserve.optimizers.distill --teacher T --student-prune '{"mlp_keep": 0.5}' ...
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .quality import HeldOut

log = logging.getLogger(__name__)


class DistillArgs(BaseModel):
    """How long and how a student learns from its teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field("pydoc", description="Training text: `pydoc`, `fortunes` or a local UTF-8 file.")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    seq_len: int = Field(256, ge=8, description="Tokens per training window.")
    batch_size: int = Field(8, ge=1, description="Windows per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, linear warm-up then cosine).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the soft targets.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target KL; 1 - alpha goes to hard-label CE. 0: train alone.")
    bf16: bool | None = Field(None, description="bf16 autocast. None: on when a GPU supports it.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps (0: only the final model).")
    seed: int = Field(0, description="Seed for data order and initialisation.")


def _windows(args: DistillArgs, tokenizer):
    from .calibration import load_text

    ids = tokenizer(load_text(args.text), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = len(ids) // args.seq_len
    if n == 0:
        raise ValueError(f"text {args.text!r} is shorter than one window of {args.seq_len} tokens")
    return ids[: n * args.seq_len].view(n, args.seq_len)


class _Windows:
    """A map-style dataset of token windows (the Trainer shuffles, shards and batches it)."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.windows[i]}


def kd_loss(student_logits, teacher_logits, input_ids, temperature: float, alpha: float):
    """alpha·T²·KL(p_T ‖ p_S) + (1-alpha)·CE, averaged over the next-token positions."""
    import torch.nn.functional as F

    s = student_logits[:, :-1].float()
    labels = input_ids[:, 1:]
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1))
    if alpha == 0 or teacher_logits is None:
        return ce, ce, None
    t = teacher_logits[:, :-1].float()
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1).reshape(-1, s.shape[-1]),
        F.log_softmax(t / temperature, -1).reshape(-1, s.shape[-1]),
        log_target=True, reduction="batchmean",
    ) * temperature**2
    return alpha * kl + (1 - alpha) * ce, ce, kl


def distill(teacher, student, tokenizer, args: DistillArgs, work_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train `student` (in place) toward `teacher` (or alone if alpha is 0 / teacher is None).

    `work_dir` holds checkpoints (`checkpoint-N/`) when save_steps > 0; `resume` continues from
    the newest one. Returns facts for the report (tokens/s, losses, seconds)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    train = _Windows(_windows(args, tokenizer))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * world
    use_teacher = teacher is not None and args.alpha > 0
    if use_teacher:
        teacher.eval().requires_grad_(False)

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            out = model(input_ids=ids)
            t_logits = None
            if use_teacher:
                if next(teacher.parameters()).device != ids.device:
                    teacher.to(ids.device)
                with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
                    t_logits = teacher(input_ids=ids).logits
            loss, ce, kl = kd_loss(out.logits, t_logits, ids, args.temperature, args.alpha)
            self._parts = (ce.detach(), kl.detach() if kl is not None else None)
            return (loss, out) if return_outputs else loss

    history: list[dict[str, float]] = []

    class Throughput(TrainerCallback):
        """Adds tokens/s, CE and KL to every log line (the progress bar prints them)."""

        def on_train_begin(self, a, state, control, **kw):
            self.t0, self.step0 = time.monotonic(), state.global_step

        def on_log(self, a, state, control, logs=None, **kw):
            if logs is None or "loss" not in logs:
                return
            secs = time.monotonic() - self.t0
            logs["tokens_per_s"] = round((state.global_step - self.step0) * tokens_per_step / max(secs, 1e-9), 1)
            ce, kl = getattr(trainer, "_parts", (None, None))
            if ce is not None:
                logs["ce"] = round(float(ce), 4)
            if kl is not None:
                logs["kl"] = round(float(kl), 4)
            history.append({"step": state.global_step, "elapsed": secs, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}})

    targs = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(args.warmup_ratio * args.steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=bf16,
        logging_steps=max(1, min(10, args.steps // 5)),
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or args.steps,
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
    )
    student.train()
    trainer = KDTrainer(model=student, args=targs, train_dataset=train, callbacks=[Throughput()])
    ckpt = None
    if resume:
        from transformers.trainer_utils import get_last_checkpoint

        ckpt = get_last_checkpoint(str(work_dir)) if Path(work_dir).exists() else None
        log.info("resuming from %s", ckpt or "scratch (no checkpoint found)")
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=ckpt)
    secs = time.monotonic() - t0
    student.eval()
    done = args.steps - (int(Path(ckpt).name.split("-")[-1]) if ckpt else 0)
    steady = None  # tokens/s between the first and last log line: without start-up and first-step costs
    if len(history) >= 2 and history[-1]["elapsed"] > history[0]["elapsed"]:
        a, b = history[0], history[-1]
        steady = round((b["step"] - a["step"]) * tokens_per_step / (b["elapsed"] - a["elapsed"]), 1)
    return {
        "steps": args.steps, "steps_run": done, "resumed_from": ckpt, "bf16": bf16, "world_size": world,
        "tokens": done * tokens_per_step, "seconds": round(secs, 2),
        "tokens_per_s": round(done * tokens_per_step / secs, 1), "tokens_per_s_steady": steady,
        "train_loss": round(result.training_loss, 4), "history": history,
        "temperature": args.temperature, "alpha": args.alpha,
    }


def model_perplexity(model, tokenizer, held_out: HeldOut) -> float:
    """Perplexity of an in-memory model (see quality.perplexity for a checkpoint on disk)."""
    import torch

    from .calibration import token_windows

    windows = token_windows(held_out.text, tokenizer, held_out.windows, held_out.seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for w in windows:
            w = w.unsqueeze(0).to(device)
            total += model(w, labels=w).loss.float().item()
    model.train(was_training)
    return math.exp(total / len(windows))


def agreement(teacher, student, tokenizer, held_out: HeldOut) -> dict[str, float]:
    """Top-1 next-token agreement and mean KL(teacher ‖ student) per token on held-out text."""
    import torch
    import torch.nn.functional as F

    from .calibration import token_windows

    windows = token_windows(held_out.text, tokenizer, held_out.windows, held_out.seq_len)
    same = kl = n = 0.0
    with torch.no_grad():
        for w in windows:
            w = w.unsqueeze(0)
            t = teacher(w.to(next(teacher.parameters()).device)).logits.float().cpu()[0]
            s = student(w.to(next(student.parameters()).device)).logits.float().cpu()[0]
            same += (t.argmax(-1) == s.argmax(-1)).sum().item()
            kl += F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum").item()
            n += t.shape[0]
    return {"top1_agreement": round(same / n, 4), "kl_per_token": round(kl / n, 4), "tokens": int(n)}


def save_student(student, tokenizer, out: Path, dtype=None) -> None:
    import torch

    if dtype is not None and dtype != torch.float32:
        student = student.to(dtype)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---- `slimserve distill` / `python -m slimserve.optimizers.distill` (torchrun-able) ----

def add_arguments(p) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint (local HF folder, or `default`)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--student", help="student checkpoint to start from (same tokenizer)")
    g.add_argument("--student-prune", metavar="JSON", help='prune the teacher into the student first, e.g. \'{"mlp_keep": 0.5, "layers_keep": 0.8}\'')
    g.add_argument("--student-config", metavar="JSON", help='teacher config overrides, randomly initialised, e.g. \'{"num_hidden_layers": 6}\'')
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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import resolve_source

    args = DistillArgs.model_validate({k: getattr(a, k) for k in DistillArgs.model_fields})
    teacher_path = resolve_source(a.teacher)
    out = Path(a.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    if a.student:
        student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    elif a.student_prune:
        from .structured import StructuredPrune

        init = out / "student-init"
        if rank0 and not init.exists():
            tmp = out / f"student-init.{os.getpid()}.tmp"
            StructuredPrune.model_validate(json.loads(a.student_prune)).run(teacher_path, tmp)
            tmp.rename(init)  # whole, or not there: other ranks wait for it below
        _barrier(init)
        student = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    else:
        cfg = AutoConfig.from_pretrained(teacher_path)
        for k, v in json.loads(a.student_config).items():
            setattr(cfg, k, v)
        torch.manual_seed(args.seed)
        student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    report: dict[str, Any] = {"teacher": str(teacher_path), "args": args.model_dump(),
                              "student_parameters": sum(p.numel() for p in student.parameters()),
                              "teacher_parameters": sum(p.numel() for p in teacher.parameters())}
    held = HeldOut(text=a.eval_text, windows=16, seq_len=min(256, args.seq_len)) if a.eval_text else None
    if held and rank0:
        report["perplexity_before"] = round(model_perplexity(student, tokenizer, held), 3)
    report["train"] = distill(teacher, student, tokenizer, args, out / "checkpoints", resume=a.resume)
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


def _barrier(path: Path, timeout: float = 3600) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="slimserve distill", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
