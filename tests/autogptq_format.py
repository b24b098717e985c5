"""Test data: rewrite a compressed-tensors W4A16 checkpoint (symmetric, grouped) in the GPTQ
layout that AutoGPTQ and GPTQModel write (qweight / qzeros / scales / g_idx, quant_method
`gptq`), so that slimserve's handling of already-quantized inputs is tested on that format.
AutoGPTQ itself cannot run here (it is archived and needs CUDA to quantize)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from safetensors.torch import load_file, save_file


def to_autogptq(src: Path, dst: Path) -> Path:
    config = json.loads((src / "config.json").read_text())
    weights_args = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights_args["num_bits"] == 4 and weights_args["symmetric"], weights_args
    group = weights_args["group_size"]
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(f))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            prefix = name[: -len(".weight_packed")]
            shape = torch.Size(tensors[prefix + ".weight_shape"].tolist())  # [out, in]
            q = unpack_from_int32(t, 4, shape)  # int8 in [-8, 7]
            scale = tensors[prefix + ".weight_scale"]  # [out, in / group]
            n_out, n_in = shape
            out[prefix + ".qweight"] = pack_to_int32(q.t().contiguous(), 4, packed_dim=0).contiguous()  # [in/8, out]
            # Symmetric: zero point 8, stored as 8 - 1 (AutoGPTQ's v1 format).
            zeros = torch.full((n_in // group, n_out), 7 - 8, dtype=torch.int8)
            out[prefix + ".qzeros"] = pack_to_int32(zeros, 4, packed_dim=1).contiguous()  # [groups, out/8]
            out[prefix + ".scales"] = scale.t().contiguous().to(torch.float16)
            out[prefix + ".g_idx"] = torch.arange(n_in, dtype=torch.int32) // group
        elif name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
            continue
        else:
            out[name] = t
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq",
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, dst / f.name)
    return dst
