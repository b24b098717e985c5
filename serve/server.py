"""The engine deployment: Ray Serve LLM's LLMServer plus one read-only method that reports what
the running engine actually loaded (not what the config asked for)."""

from __future__ import annotations

import os
from typing import Any

from ray.serve.llm.deployment import LLMServer


class SlimServer(LLMServer):
    async def slimserve_info(self) -> dict[str, Any]:
        """Facts from the live vLLM engine and the on-load step, for /v1/models and tests."""
        engine_client = getattr(self.engine, "_engine_client", None)
        vllm_config = getattr(engine_client, "vllm_config", None)
        callback = self._llm_config.get_or_create_callback()
        info: dict[str, Any] = {"optimization": callback.ctx.custom_data.get("slimserve", {}), "pid": os.getpid()}
        if vllm_config is not None:
            mc = vllm_config.model_config
            info.update(
                checkpoint=mc.model,
                quantization=mc.quantization,
                dtype=str(mc.dtype).removeprefix("torch."),
                max_model_len=mc.max_model_len,
                tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
                device=str(vllm_config.device_config.device_type),
            )
        return info
