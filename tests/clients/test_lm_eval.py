"""lm-evaluation-harness (`--model local-completions`, as its users run it) scores a small
multiple-choice task the test writes (no downloads) against the real server: each loglikelihood
it computes, and whether the continuation was greedy, equals transformers' forward on the same
token ids. It sends token-id prompts, several per request, with echo, logprobs 1 and max_tokens 1."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo")]
COLOURS = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("snow", "white"),
           ("a ripe banana", "yellow"), ("coal", "black"), ("a ripe tomato", "red")]


def docs() -> list[dict]:
    out = []
    for i, (country, city) in enumerate(CAPITALS):
        wrong = [CAPITALS[(i + 3) % len(CAPITALS)][1], CAPITALS[(i + 7) % len(CAPITALS)][1]]
        choices = wrong[:i % 3] + [city] + wrong[i % 3:]
        out.append({"question": f"Question: What is the capital of {country}?\nAnswer:", "choices": choices,
                    "answer": choices.index(city)})
    for i, (thing, colour) in enumerate(COLOURS):
        choices = sorted({colour, COLOURS[(i + 1) % len(COLOURS)][1], COLOURS[(i + 2) % len(COLOURS)][1]})
        out.append({"question": f"The colour of {thing} is", "choices": choices, "answer": choices.index(colour)})
    for a in range(2, 10):
        choices = [str(a + a + d) for d in (-1, 0, 1)]
        out.append({"question": f"{a} + {a} =", "choices": choices, "answer": 1})
    return out


def write_task(folder) -> None:
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs()))
    (folder / "sagellm_scoring.yaml").write_text(
        "task: sagellm_scoring\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")


def reference(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """transformers' loglikelihood of `continuation` after `context`, tokenized as lm-eval does
    (trailing spaces move to the continuation; the whole encoded, then split; no special tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tokenizer(context, add_special_tokens=False).input_ids)
    with torch.inference_mode():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)  # [len(whole), vocab]
    rows = logprobs[n_ctx - 1:len(whole) - 1]  # row p scores token p + 1
    targets = torch.tensor(whole[n_ctx:])
    return rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


def test_lm_eval_local_completions_loglikelihoods_equal_transformers(server, loaded_model, reference_model,
                                                                     tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    write_task(tmp_path)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": loaded_model.served_name, "base_url": server.url + "/v1/completions",
                    "tokenizer_backend": "huggingface", "tokenizer": str(loaded_model.source.path),
                    "num_concurrent": 1, "max_retries": 1},
        tasks=["sagellm_scoring"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=4, log_samples=True)
    samples = results["samples"]["sagellm_scoring"]
    assert len(samples) == len(docs())
    worst, scores, greedy_seen = 0.0, [], set()
    for s in samples:
        assert len(s["arguments"]) == len(s["resps"]) == len(s["doc"]["choices"])
        for (context, continuation), [(ll, is_greedy)] in zip(s["arguments"], s["resps"]):
            want, want_greedy = reference(reference_model, loaded_model.tokenizer, context, continuation)
            worst = max(worst, abs(ll - want))
            assert is_greedy == want_greedy, (context, continuation)
            greedy_seen.add(is_greedy)
            scores.append(ll)
    print(f"largest loglikelihood difference against transformers: {worst:.2e} over {len(scores)} requests")
    assert worst < 1e-3
    assert greedy_seen == {True, False} and min(scores) < -1.0  # the task discriminates: not all 0
    acc = sum(max(range(len(s["resps"])), key=lambda c: s["resps"][c][0][0]) == s["doc"]["answer"]
              for s in samples) / len(samples)
    assert results["results"]["sagellm_scoring"]["acc,none"] == pytest.approx(acc)
