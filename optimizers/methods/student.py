"""`student`: serve a distilled student under the teacher's public name.

The student is either a given checkpoint (`path`, e.g. written by `slimserve distill`) or made
once by a recipe (prune the teacher, or a smaller config of it, then distill; cached like any
artifact). Either way the build measures how closely it follows the teacher on held-out text
(top-1 next-token agreement and KL per token) and stores that in the manifest; the quality
gate (perplexity ratio to the teacher) applies as for quantization.

    variants:
      - {name: student, student: /models/smollm2-student}          # a trained checkpoint
      - name: student-recipe
        student: {prune: {mlp_keep: 0.5}, distill: {steps: 2000}}   # built once, cached
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimserve.optimizers.cache.store import folder_digest
from slimserve.optimizers.calibration import Calibration
from slimserve.optimizers.training.kd_trainer import DistillArgs, agreement, distill, save_student
from slimserve.optimizers.quality import HeldOut, load_for_inference
from slimserve.optimizers.registry import Optimization, register
from slimserve.optimizers.methods.structured import StructuredPrune, saved_dtype
from slimserve.optimizers.training.student_init import init_student


class StudentRecipe(BaseModel):
    """How to make a student from the teacher: one of `prune` or `config`, then `distill`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune: dict[str, Any] | None = Field(None, description="`structured` parameters: the student is a pruned copy of the teacher.")
    config: dict[str, Any] | None = Field(None, description="Teacher config overrides (e.g. num_hidden_layers): a smaller model of the same family, randomly initialised.")
    distill: DistillArgs = Field(default_factory=DistillArgs)

    @model_validator(mode="after")
    def _one_init(self) -> "StudentRecipe":
        if (self.prune is None) == (self.config is None):
            raise ValueError("a student recipe needs exactly one of `prune` or `config`")
        return self


@register
class Student(Optimization):
    """A distilled student served in the teacher's place."""

    method: Literal["student"] = "student"
    path: str | None = Field(None, description="A trained student checkpoint (local HF folder) sharing the teacher's tokenizer.")
    recipe: StudentRecipe | None = Field(None, description="Make the student at load instead (runs once, then cached).")
    agreement: HeldOut = Field(
        HeldOut(text="fortunes", windows=8, seq_len=256),
        description="Held-out text on which agreement with the teacher is measured.",
    )
    libraries = ("torch", "transformers", "accelerate")
    needs_optimizer_env = False  # torch + transformers only
    version = 1

    @model_validator(mode="after")
    def _one_source(self) -> "Student":
        if (self.path is None) == (self.recipe is None):
            raise ValueError("method student needs exactly one of `path` (a checkpoint) or `recipe`")
        return self

    def input_digest(self) -> str | None:
        """Content hash of the student checkpoint (a changed student is a new artifact)."""
        if self.path is None:  # a recipe: the training text is its input
            return Calibration(text=self.recipe.distill.text).digest()
        root = Path(self.path).expanduser()
        if not (root / "config.json").exists():
            raise FileNotFoundError(f"student {self.path}: no config.json (not a Hugging Face checkpoint folder)")
        return folder_digest(root, skip=lambda rel: "checkpoints" in rel.parts)  # training checkpoints are not served

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        report: dict[str, Any] = {}
        if self.path is not None:
            src = Path(self.path).expanduser().resolve()
            _check_tokenizer(base, src)
            out.mkdir(parents=True, exist_ok=True)
            for p in src.iterdir():
                if p.is_file() and p.name != "slimserve-manifest.json":
                    shutil.copy2(p, out / p.name)
            if not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists():
                tokenizer.save_pretrained(out)  # served under the teacher's name with its tokenizer
            report["student"] = str(src)
        else:
            report["distill"] = self._make(base, out, tokenizer)
        # Both in the dtype they were saved in, on the accelerator when there is one (not fp32 on CPU).
        teacher, student = load_for_inference(base), load_for_inference(out)
        if self.agreement.available():
            report["agreement"] = {**agreement(teacher, student, tokenizer, self.agreement), "held_out": self.agreement.model_dump()}
        params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        report["parameters"] = [params(teacher), params(student)]
        return report

    def _make(self, base: Path, out: Path, tokenizer) -> dict[str, Any]:
        r = self.recipe
        prune = StructuredPrune.model_validate({**r.prune, "method": "structured"}) if r.prune is not None else None
        work = out.parent / (out.name + ".student-work")
        try:
            student = init_student(base, prune, r.config, r.distill.seed, work / "init")
            # The teacher only runs forward: in the dtype it was saved in. The student trains in fp32.
            teacher = load_for_inference(base)
            train = distill(teacher, student, tokenizer, r.distill, work / "checkpoints")
            save_student(student.cpu(), tokenizer, out, saved_dtype(base))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        train.pop("history", None)
        return train


def _check_tokenizer(teacher: Path, student: Path) -> None:
    """The student must read and write the teacher's tokens: same vocabulary size, and the same
    tokenizer.json when it ships one."""
    t_cfg = json.loads((teacher / "config.json").read_text())
    s_cfg = json.loads((student / "config.json").read_text())
    if t_cfg.get("vocab_size") != s_cfg.get("vocab_size"):
        raise ValueError(
            f"student {student} has vocab_size {s_cfg.get('vocab_size')}, the teacher {t_cfg.get('vocab_size')}: "
            "a student must share the teacher's tokenizer"
        )
    t_tok, s_tok = teacher / "tokenizer.json", student / "tokenizer.json"
    if t_tok.exists() and s_tok.exists() and t_tok.read_bytes() != s_tok.read_bytes():
        raise ValueError(f"student {student} ships a tokenizer different from the teacher's: a student must share it")
