"""Knowledge distillation, teacher → student, on text files: the trainer behind KD healing after
structured pruning, the `student` method's recipe and `slimserve distill` (distill.py).

The loss is Hinton et al. (2015): alpha x T² x KL(teacher/T ‖ student/T) + (1 - alpha) x CE on
the next token. Training is transformers' Trainer: bf16 autocast (`bf16`), gradient
accumulation, checkpoints every `save_steps` and resume, a progress bar whose log lines carry
loss and tokens/s, and data-parallel over GPUs when started by torchrun.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slimserve.optimizers.calibration import token_windows
from slimserve.optimizers.quality import HeldOut

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


def distill(teacher, student, tokenizer, args: DistillArgs, work_dir: Path, resume: bool = False,
            callbacks: list | None = None) -> dict[str, Any]:
    """Train `student` (in place) toward `teacher` (or alone if alpha is 0 / teacher is None).

    `work_dir` holds checkpoints (`checkpoint-N/`) when save_steps > 0; `resume` continues from
    the newest one; `callbacks`: more transformers TrainerCallbacks (e.g. a pruning schedule).
    Returns facts for the report (tokens/s, losses, seconds)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    # A map-style dataset of every window of the text: the Trainer shuffles, shards and batches it.
    train = [{"input_ids": w} for w in token_windows(args.text, tokenizer, None, args.seq_len)]
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
    trainer = KDTrainer(model=student, args=targs, train_dataset=train, callbacks=[Throughput(), *(callbacks or [])])
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


def agreement(teacher, student, tokenizer, held_out: HeldOut) -> dict[str, float]:
    """Top-1 next-token agreement and mean KL(teacher ‖ student) per token on held-out text."""
    import torch
    import torch.nn.functional as F

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
