"""SM_NUM_GPUS=3 on CPU (gloo) for a family besides Llama: a tiny Gemma 2 (alternating sliding and
full layers, attention and final logit softcapping, query_pre_attn_scalar) with 6 heads and 3 KV
heads split over 3 ranks answers as the single-rank server and as transformers' eager forward."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Server
from families import Reference, build
from helpers import post

PROMPTS = [
    "Tensor parallelism splits every attention layer's heads across ranks: each rank projects its own "
    "queries, keys and values, attends over its share of the cache, and the output projections are "
    "summed across ranks before the residual add. The MLP is split the same way, by columns and rows: "
    "the gate and up projections by their output features, the down projection by its input features, "
    "so one all-reduce per block is all the communication a forward pass needs.",
    "A sliding window limits each token to the most recent keys, which keeps the cache small for long "
    "documents while full layers still see everything; softcapping bounds the attention scores so no "
    "single key can take all of the probability mass, and the final logits are bounded the same way. "
    "Gemma 2 alternates the two kinds of layers, one sliding and one full, all the way up the stack.",
]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from sagellm.model.bundled import bundled_model_dir

    folder = build("gemma2", tmp_path_factory.mktemp("gemma2"), bundled_model_dir(), num_attention_heads=6,
                   num_key_value_heads=3, hidden_size=192, intermediate_size=384)
    return folder, Reference(folder)


def answers(srv) -> list[dict]:
    def one(prompt: str) -> dict:
        r = post(srv, "/generate", {"inputs": prompt, "parameters": {
            "max_new_tokens": 8, "details": True, "decoder_input_details": True}})
        assert r.status_code == 200, r.text
        return r.json()["details"]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # one concurrent batch
        return list(pool.map(one, PROMPTS))


def test_three_ranks_answer_as_one_and_as_transformers(gemma2):
    folder, ref = gemma2
    assert all(len(ref.tokenizer(p).input_ids) > 64 for p in PROMPTS)  # past the window (32), in 2+ chunks
    env = {"HF_MODEL_ID": str(folder), "DTYPE": "float32", "MAX_BATCH_PREFILL_TOKENS": "64",
           "MAX_TOTAL_TOKENS": "1024"}
    got = {}
    for ranks in (1, 3):
        srv = Server(env={**env, "SM_NUM_GPUS": str(ranks)}, timeout=300)
        try:
            got[ranks] = answers(srv)
            assert f"tensor_parallel={ranks}" in srv.log()
        finally:
            srv.stop()
    for prompt, one, three in zip(PROMPTS, got[1], got[3]):
        ids = ref.tokenizer(prompt).input_ids
        tokens = [t["id"] for t in three["tokens"]]
        assert tokens == [t["id"] for t in one["tokens"]] == ref.greedy(ids, 8)
        want = ref.logprobs(ids + tokens)
        for details in (one, three):
            scored = [t["logprob"] for t in details["prefill"][1:] + details["tokens"]]
            assert max(abs(g - w) for g, w in zip(scored, want, strict=True)) < 2e-3
