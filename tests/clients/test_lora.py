"""Multi-LoRA through the real server on both engines (ENGINE=vllm: vLLM's LoRARequest), fp32: greedy tokens of each adapter equal peft's merged
model, chosen by TGI's adapter_id, SageMaker's header on /invocations and OpenAI's model field;
rows of the base model and three adapters share steps; adapters load and unload at run time
(requests in flight finish first, also while other adapters stream) and swap in and out beyond
MAX_LORAS."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import ENGINES, Server, start_vllm_server, stop_vllm_server
from helpers import TIMEOUT, oai_error, post, tgi_error
from lora_adapters import greedy, make_adapter, merged_model

PROMPT = ("Here is a long story about a small robot who lived in a quiet village by the sea and dreamed "
          "of flying over the mountains one day. Every morning the robot")
N = 6  # tokens per answer: enough to tell the adapters apart (the fixture checks), cheap on 2 cores
N_LONG = 16  # the request that outlives its adapter's unloading
BASE_NAMES = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Adapters alpha (attention, r4), beta (MLP, r8, named by its folder), gamma (all seven
    projections, r16, rsLoRA, found under SM_MODEL_DIR/adapters/), delta (loaded at run time);
    the reference greedy tokens of each."""
    from transformers import AutoTokenizer

    from sagellm.model import bundled

    base = str(bundled.bundled_model_dir(None))
    made = tmp_path_factory.mktemp("lora")
    model_dir = made / "model"
    (model_dir / "adapters").mkdir(parents=True)
    adapters = {name: make_adapter(base, name, made if name != "gamma" else model_dir / "adapters", seed)
                for seed, name in enumerate(BASE_NAMES)}
    prompt_ids = AutoTokenizer.from_pretrained(base)(PROMPT).input_ids
    refs = {None: greedy(merged_model(base, None), prompt_ids, N)}
    for name, a in adapters.items():
        refs[name] = greedy(merged_model(base, a.path), prompt_ids, N_LONG if name == "delta" else N)
    refs["delta-long"], refs["delta"] = refs["delta"], refs["delta"][:N]
    assert len({tuple(r) for r in refs.values()}) == len(refs), f"an adapter leaves the answer unchanged: {refs}"
    return model_dir, adapters, refs


@pytest.fixture(scope="module", params=ENGINES)
def lora(request, made):
    """A server with alpha, beta and gamma, MAX_LORAS=3, on each engine (the test ids say which)."""
    model_dir, adapters, refs = made
    env = {"LORA_ADAPTERS": f"alpha={adapters['alpha'].path},{adapters['beta'].path}",
           "SM_MODEL_DIR": str(model_dir), "MAX_LORAS": "3", "MAX_CONCURRENT_REQUESTS": "16"}
    if request.param == "vllm":
        srv = start_vllm_server(env)
        yield srv, adapters, refs
        stop_vllm_server(srv)
    else:
        srv = Server(env=env)
        srv.engine = "sagellm"
        yield srv, adapters, refs
        srv.stop()


def native(adapter: str | None, n: int = N) -> dict:
    params = {"max_new_tokens": n, "details": True, "ignore_eos": True, "do_sample": False}
    if adapter is not None:
        params["adapter_id"] = adapter
    return {"inputs": PROMPT, "parameters": params}


def ids_of(r: requests.Response) -> list[int]:
    assert r.status_code == 200, r.text
    body = r.json()
    body = body[0] if isinstance(body, list) else body
    return [t["id"] for t in body["details"]["tokens"]]


def test_v1_models_lists_the_base_model_and_every_adapter(lora):
    srv = lora[0]
    data = requests.get(srv.url + "/v1/models", timeout=TIMEOUT).json()["data"]
    base = data[0]["id"]
    assert [d["id"] for d in data[1:]] == ["gamma", "alpha", "beta"], data
    assert all(d.get("parent") == base for d in data[1:]), data


def test_adapter_id_answers_equal_peft_merged_model(lora):
    srv, _, refs = lora
    # The base model first: its prompt blocks are then in the prefix cache, which no adapter may use.
    assert ids_of(post(srv, "/generate", native(None))) == refs[None]
    for name in ("alpha", "beta", "gamma"):
        assert ids_of(post(srv, "/generate", native(name))) == refs[name], name


def test_header_on_invocations_selects_the_adapter(lora):
    srv, _, refs = lora
    for name in ("gamma", "beta"):
        r = post(srv, "/invocations", native(None), headers={"X-Amzn-SageMaker-Adapter-Identifier": name})
        assert ids_of(r) == refs[name], name
    r = post(srv, "/invocations", native("alpha"), headers={"X-Amzn-SageMaker-Adapter-Identifier": "beta"})
    assert "alpha" in tgi_error(r, 422)


def test_openai_model_field_selects_the_adapter(lora):
    from transformers import AutoTokenizer

    from sagellm.model import bundled

    srv, _, refs = lora
    tok = AutoTokenizer.from_pretrained(str(bundled.bundled_model_dir(None)))
    base_name = requests.get(srv.url + "/v1/models", timeout=TIMEOUT).json()["data"][0]["id"]
    for model, expect in (("alpha", "alpha"), (base_name, None), ("no-such-name", None)):
        r = post(srv, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
                                         "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(refs[expect]), model
        assert r.json()["model"] == (expect or base_name)


def test_unknown_adapter_is_404_naming_it_and_the_loaded_ones(lora):
    srv = lora[0]
    msg = tgi_error(post(srv, "/generate", native("nope")), 404)
    assert "nope" in msg and "alpha" in msg, msg
    r = post(srv, "/invocations", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
             headers={"X-Amzn-SageMaker-Adapter-Identifier": "nope"})
    assert "nope" in oai_error(r, 404)["message"]


def test_mixed_concurrent_batch_of_base_and_three_adapters(lora):
    srv, _, refs = lora
    names = [None, "alpha", "beta", "gamma"]
    with ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda n: ids_of(post(srv, "/generate", native(n))), names))
    for name, ids in zip(names, got):
        assert ids == refs[name], name
    # Metrics and the request log name the adapter of each request.
    metrics = requests.get(srv.url + "/metrics", timeout=TIMEOUT).text
    for name in ("alpha", "beta", "gamma"):
        assert f'sagellm_lora_requests_total{{adapter="{name}"}}' in metrics, metrics[-2000:]
    assert "sagellm_lora_adapters_resident 3.0" in metrics
    assert '"route":"/generate","status":200' in srv.log() and '"adapter":"gamma"' in srv.log()


def test_load_and_unload_at_run_time_with_lru_swap(lora):
    srv, adapters, refs = lora
    delta = adapters["delta"].path
    assert tgi_error(post(srv, "/generate", native("delta")), 404)
    r = post(srv, "/adapters", {"name": "delta", "src": delta})
    assert r.status_code == 200, r.text
    assert ids_of(post(srv, "/generate", native("delta"))) == refs["delta"]
    # Four registered, three resident: delta swapped one out, and it comes back in.
    for name in ("alpha", "beta", "gamma"):
        assert ids_of(post(srv, "/generate", native(name))) == refs[name], name
    assert "already" in tgi_error(post(srv, "/adapters", {"name": "delta", "src": delta}), 422)
    assert requests.delete(srv.url + "/adapters/delta", timeout=TIMEOUT).status_code == 200
    assert "delta" in tgi_error(post(srv, "/generate", native("delta")), 404)
    assert tgi_error(requests.delete(srv.url + "/adapters/delta", timeout=TIMEOUT), 404)
    # vLLM's routes, under another name for the same folder.
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "delta-v", "lora_path": delta})
    assert r.status_code == 200, r.text
    assert ids_of(post(srv, "/generate", native("delta-v"))) == refs["delta"]
    assert post(srv, "/v1/unload_lora_adapter", {"lora_name": "delta-v"}).status_code == 200
    assert oai_error(post(srv, "/v1/unload_lora_adapter", {"lora_name": "delta-v"}), 404)
    bad = post(srv, "/adapters", {"name": "broken", "src": str(srv.log_path)})
    assert "broken" in tgi_error(bad, 422)


def test_unloading_lets_requests_in_flight_finish(lora):
    srv, adapters, refs = lora
    assert post(srv, "/adapters", {"name": "delta", "src": adapters["delta"].path}).status_code == 200
    long = native("delta", N_LONG)
    long["stream"] = True
    resp = requests.post(srv.url + "/generate_stream", json=long, stream=True, timeout=TIMEOUT)
    lines = resp.iter_lines()
    first = next(line for line in lines if line.startswith(b"data:"))  # the request is running
    unloaded = {}

    def unload():
        unloaded["r"] = requests.delete(srv.url + "/adapters/delta", timeout=TIMEOUT)
        unloaded["t"] = time.monotonic()

    t = threading.Thread(target=unload)
    t.start()
    time.sleep(0.3)
    # While it drains, new requests naming it are refused at once.
    assert "delta" in tgi_error(post(srv, "/generate", native("delta")), 404)
    tokens = [json.loads(first[5:])["token"]["id"]]
    for line in lines:
        if line.startswith(b"data:"):
            tokens.append(json.loads(line[5:])["token"]["id"])
    ended = time.monotonic()
    t.join(TIMEOUT)
    assert unloaded["r"].status_code == 200, unloaded["r"].text
    assert unloaded["t"] >= ended - 0.5
    assert tokens == refs["delta-long"]


def stream_ids(srv, body: dict) -> tuple[int, list[int]]:
    """(status, token ids) of a /generate_stream request read to its end."""
    with requests.post(srv.url + "/generate_stream", json={**body, "stream": True}, stream=True, timeout=TIMEOUT) as r:
        if r.status_code != 200:
            return r.status_code, []
        return 200, [json.loads(line[5:])["token"]["id"] for line in r.iter_lines() if line.startswith(b"data:")]


def test_load_and_unload_while_other_adapters_stream(lora):
    """Streams on the base model, alpha and beta run without pause while delta is loaded, used and
    unloaded mid-request, through SageMaker's routes and then vLLM's: none fails or changes its
    answer, the request in flight on delta ends with delta's answer, then delta is a 404."""
    srv, adapters, refs = lora
    stop = threading.Event()
    answers: list[tuple[str | None, int, list[int]]] = []

    def keep_streaming(name):
        while not stop.is_set():
            answers.append((name, *stream_ids(srv, native(name))))

    path = adapters["delta"].path
    routes = [(lambda: post(srv, "/adapters", {"name": "delta", "src": path}),
               lambda: requests.delete(srv.url + "/adapters/delta", timeout=TIMEOUT)),
              (lambda: post(srv, "/v1/load_lora_adapter", {"lora_name": "delta", "lora_path": path}),
               lambda: post(srv, "/v1/unload_lora_adapter", {"lora_name": "delta"}))]
    with ThreadPoolExecutor(4) as pool:
        background = [pool.submit(keep_streaming, name) for name in (None, "alpha", "beta")]
        try:
            for load, unload in routes:
                assert load().status_code == 200
                body = {**native("delta", N_LONG), "stream": True}
                with requests.post(srv.url + "/generate_stream", json=body, stream=True, timeout=TIMEOUT) as resp:
                    lines = (json.loads(line[5:]) for line in resp.iter_lines() if line.startswith(b"data:"))
                    tokens = [next(lines)["token"]["id"]]  # the request is running
                    removing = pool.submit(unload)
                    time.sleep(0.3)
                    assert "delta" in tgi_error(post(srv, "/generate", native("delta")), 404)  # while it drains
                    tokens += [event["token"]["id"] for event in lines]
                assert removing.result(TIMEOUT).status_code == 200
                assert tokens == refs["delta-long"]
                assert "delta" in tgi_error(post(srv, "/generate", native("delta")), 404)
        finally:
            stop.set()
        for f in background:
            f.result(TIMEOUT)
    for name in (None, "alpha", "beta"):
        mine = [a for a in answers if a[0] == name]
        assert len(mine) >= 2, (name, len(mine))
        assert all(status == 200 and ids == refs[name] for _, status, ids in mine), (name, mine)


def test_an_adapter_whose_files_went_away_after_loading_fails_alone(lora, tmp_path):
    """Our engine holds an adapter's weights from its registration, so it answers; vLLM reads them
    when a request first names it: that request gets a 503 naming the adapter, and vLLM goes on
    serving the base model and the other adapters."""
    srv, adapters, refs = lora
    folder = shutil.copytree(adapters["delta"].path, tmp_path / "gone")
    assert post(srv, "/adapters", {"name": "gone", "src": str(folder)}).status_code == 200
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    r = post(srv, "/generate", native("gone"))
    if srv.engine == "vllm":
        assert "`gone` could not be loaded by vLLM" in tgi_error(r, 503)
    else:
        assert ids_of(r) == refs["delta"]
    assert requests.delete(srv.url + "/adapters/gone", timeout=TIMEOUT).status_code == 200
    for name in (None, "alpha"):
        assert ids_of(post(srv, "/generate", native(name))) == refs[name], name
    assert requests.get(srv.url + "/ping", timeout=TIMEOUT).status_code == 200


def test_serve_stops_with_one_line_naming_a_bad_adapter(lora):
    from test_serve_startup import Proc, base_env

    p = Proc(base_env(ENGINE=lora[0].engine, LORA_ADAPTERS=f"small={lora[1]['alpha'].path}", MAX_LORA_RANK="2"))
    rc = p.wait(120)
    out = p.output
    assert rc != 0, out
    assert any("`small`" in line and "MAX_LORA_RANK=2" in line for line in out.splitlines()), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
