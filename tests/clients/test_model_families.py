"""Each supported model family through the real server (fp32, prefix caching on, prompts in
chunks of 64 tokens) against transformers' eager forward on the same folder: greedy tokens, every
prompt token's logprob and every generated token's logprob, for prompts longer than the sliding
windows and than a prefill chunk, alone, in a concurrent batch, and from prefix-cached blocks.
One tiny random-weight model per family (tests/families.py), one server per family."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import Server
from families import FAMILIES, Reference, build
from helpers import post

TOLERANCE = 2e-3  # nats; measured differences are near 1e-5 (fp32 sums in another order)
NEW_TOKENS = 8
PROMPTS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as "
    "his father had taught him: one hundred and twelve, never more, never fewer. At the top he "
    "trimmed the wick, polished the great lens with a soft cloth, and watched the ships slide past "
    "the rocks below, their lanterns swaying like slow fireflies over the dark water.",
    "Photosynthesis turns light into chemical energy. In the chloroplasts of a leaf, pigments such "
    "as chlorophyll absorb red and blue light, and that energy splits water into oxygen, protons "
    "and electrons. The electrons travel along a chain of proteins in the thylakoid membrane, "
    "pumping protons across it; the resulting gradient drives an enzyme that makes ATP. In the "
    "Calvin cycle, ATP and NADPH then fix carbon dioxide from the air into three-carbon sugars, "
    "which the plant assembles into glucose, starch and cellulose for growth and storage.",
    "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
    "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n\n"
    "# merge_sorted([1, 4, 9], [2, 3, 10]) returns [1, 2, 3, 4, 9, 10]; the loop stops once either "
    "list runs out, and the slices append whatever remains of the other one, already in order.",
]
MAX_DIFF: dict[str, float] = {}  # per family, the largest |logprob - reference| seen


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    from sagellm.model.bundled import bundled_model_dir

    name = request.param
    folder = build(name, tmp_path_factory.mktemp(name), bundled_model_dir())
    srv = Server(env={"HF_MODEL_ID": str(folder), "DTYPE": "float32", "PREFIX_CACHING": "true",
                      "MAX_BATCH_PREFILL_TOKENS": "64", "MAX_TOTAL_TOKENS": "1024",
                      "MAX_CONCURRENT_REQUESTS": "8"}, timeout=180)
    yield name, srv, Reference(folder)
    srv.stop()
    print(f"\n{name}: largest |logprob - transformers| {MAX_DIFF.get(name, float('nan')):.2e}")  # pytest -s


def generate(srv, prompt: str, prompt_logprobs: bool = True) -> dict:
    r = post(srv, "/generate", {"inputs": prompt, "parameters": {
        "max_new_tokens": NEW_TOKENS, "details": True, "decoder_input_details": prompt_logprobs}})
    assert r.status_code == 200, r.text
    return r.json()["details"]


def check(name: str, ref: Reference, prompt: str, details: dict, prompt_logprobs: bool = True) -> None:
    ids = ref.tokenizer(prompt).input_ids
    tokens = [t["id"] for t in details["tokens"]]
    assert tokens == ref.greedy(ids, NEW_TOKENS), f"{name}: greedy tokens differ"
    expected = ref.logprobs(ids + tokens)
    got = [t["logprob"] for t in details["tokens"]]
    want = expected[len(ids) - 1:]
    if prompt_logprobs:
        prefill = details["prefill"]
        assert [t["id"] for t in prefill] == ids
        assert prefill[0]["logprob"] is None
        got = [t["logprob"] for t in prefill[1:]] + got
        want = expected
    diff = max(abs(g - w) for g, w in zip(got, want, strict=True))
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)
    assert diff < TOLERANCE, f"{name}: a logprob is {diff:.3g} away from transformers'"


def prefix_hits(srv) -> float:
    text = requests.get(srv.url + "/metrics", timeout=30).text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("sagellm_prefix_cache_hit_tokens")))


def test_prompts_alone_and_in_a_concurrent_batch_score_as_transformers(family):
    name, srv, ref = family
    assert all(len(ref.tokenizer(p).input_ids) > 64 for p in PROMPTS)  # several chunks, past every window
    check(name, ref, PROMPTS[0], generate(srv, PROMPTS[0]))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: generate(srv, p), PROMPTS))
    for prompt, details in zip(PROMPTS, answers):
        check(name, ref, prompt, details)


def test_a_prompt_from_prefix_cached_blocks_answers_as_transformers(family):
    name, srv, ref = family
    generate(srv, PROMPTS[1], prompt_logprobs=False)  # its full blocks go to the prefix cache
    before = prefix_hits(srv)
    shared = PROMPTS[1][:500] + " Roots, by contrast, take up water and minerals from the soil."
    check(name, ref, shared, generate(srv, shared, prompt_logprobs=False), prompt_logprobs=False)
    assert prefix_hits(srv) - before >= 64  # at least four cached blocks were reused



def test_a_model_using_an_unimplemented_attention_feature_stops_start_up_with_one_line(tmp_path):
    """Gemma 3 with bidirectional attention (as EmbeddingGemma): refused at load, not served wrong."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port
    from sagellm.model.bundled import bundled_model_dir

    folder = build("gemma3_text", tmp_path, bundled_model_dir(), use_bidirectional_attention=True)
    env = {k: v for k, v in os.environ.items() if k != "SM_NUM_GPUS"}
    env.update({"HF_MODEL_ID": str(folder), "PORT": str(free_port()), "HF_HUB_OFFLINE": "1"})
    proc = subprocess.run([sys.executable, str(ROOT / "serve"), "serve"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    lines = [line for line in out.splitlines() if "model type gemma3_text: its attention is not causal" in line]
    assert lines and "README" in lines[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]
