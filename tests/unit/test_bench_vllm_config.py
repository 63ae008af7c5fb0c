"""bench/vllm_config.py reads vLLM's logged engine configuration into whole fields: values with
commas inside brackets or quotes (a dataclass repr, a dict) stay one field, so bench/run.py's
`differs:` line shows them whole (it used to cut StructuredOutputsConfig(backend='guidance', ...)
after its first field and count the rest as fields of their own)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from vllm_config import parse_config, vllm_config  # noqa: E402  (bench/vllm_config.py)

# From a vLLM 0.32 start-up log (bench-results/20261130T022601Z/vllm.log), shortened.
LOGGED = ("model='/root/.cache/sagellm/smollm2-135m-instruct', speculative_config=None, dtype=torch.bfloat16, "
          "max_seq_len=8192, aux_output_config=AuxOutputConfig(enable_return_routed_experts=False, max_bytes=None), "
          "structured_outputs_config=StructuredOutputsConfig(backend='guidance', disable_any_whitespace=False, "
          "reasoning_parser='', enable_in_reasoning=False), seed=0, served_model_name=smollm2, "
          "compilation_config={'mode': <CompilationMode.DYNAMO_TRACE_ONCE: 2>, 'custom_ops': ['none'], "
          "'pass_config': {'fuse_norm_quant': False, 'fuse_act_quant': False}, 'splitting_ops': []}, "
          "kernel_config=KernelConfig(ir_op_priority=IrOpPriorityConfig(rms_norm=['native'], "
          "fused_add_rms_norm=['native']), moe_backend='auto'), note='a, b=c', tokenizer=/opt/it's, last=1")


def test_values_with_commas_stay_whole():
    config = parse_config(LOGGED)
    assert list(config) == ["model", "speculative_config", "dtype", "max_seq_len", "aux_output_config",
                            "structured_outputs_config", "seed", "served_model_name", "compilation_config",
                            "kernel_config", "note", "tokenizer", "last"]
    assert config["structured_outputs_config"] == ("StructuredOutputsConfig(backend='guidance', "
                                                   "disable_any_whitespace=False, reasoning_parser='', "
                                                   "enable_in_reasoning=False)")
    assert config["compilation_config"].endswith("'splitting_ops': []}")
    assert config["kernel_config"].endswith("moe_backend='auto')")
    assert config["note"] == "'a, b=c'" and config["tokenizer"] == "/opt/it's" and config["last"] == "1"
    assert config["seed"] == "0" and config["model"] == "'/root/.cache/sagellm/smollm2-135m-instruct'"


def test_two_logs_differ_in_the_one_field(tmp_path):
    theirs = LOGGED.replace("backend='guidance'", "backend='auto'")
    for name, text in (("ours", LOGGED), ("theirs", theirs)):
        (tmp_path / f"{name}.log").write_text(f"INFO starting\n(EngineCore pid=1) INFO [core.py:133] Initializing "
                                              f"a V1 LLM engine (v0.32.0) with config: {text}\nINFO done\n")
    ours, other = vllm_config(tmp_path / "ours.log"), vllm_config(tmp_path / "theirs.log")
    assert {k for k in ours if ours[k] != other.get(k)} == {"structured_outputs_config"}
    assert "backend='auto', disable_any_whitespace=False" in other["structured_outputs_config"]
    (tmp_path / "plain.log").write_text("no vLLM here\n")
    assert vllm_config(tmp_path / "plain.log") == {}
