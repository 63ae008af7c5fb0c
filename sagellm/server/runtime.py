"""The model and engine behind the app: loaded in the background so /ping can answer 503 (fast)
until the model is loaded and warmed up, then 200 while the engine makes progress."""

from __future__ import annotations

import logging
import os
import threading
import time

from sagellm.api.context import ServingContext
from sagellm.errors import SagellmError
from sagellm.settings import Settings

log = logging.getLogger("sagellm")

# gunicorn's master halts (instead of restarting the worker) on this exit status.
WORKER_BOOT_ERROR = 3


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = "loading"  # loading -> ready | failed; stopping at shutdown
        self.error: str | None = None
        self.ctx: ServingContext | None = None
        self.engine = None
        self.loaded = None
        self.handlers = None  # sagellm.server.handlers.Handlers once ready
        self.started = time.monotonic()
        self.ready_at: float | None = None

    # ---- start-up ----

    def start_background(self, exit_on_failure: bool = True) -> threading.Thread:
        t = threading.Thread(target=self._load, args=(exit_on_failure,), name="sagellm-load", daemon=True)
        t.start()
        return t

    def _load(self, exit_on_failure: bool) -> None:
        try:
            self._build()
            self.state = "ready"
            self.ready_at = time.monotonic()
            log.info("ready in %.1fs: serving %s", self.ready_at - self.started, self.ctx.served_name)
        except Exception as exc:
            self.state = "failed"
            self.error = exc.message if isinstance(exc, SagellmError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, SagellmError):
                log.exception("start-up failed")
            log.error("start-up failed: %s", self.error)
            if self.engine is not None:  # vLLM's processes must not outlive us
                self.engine.stop()
            if exit_on_failure:
                logging.shutdown()
                os._exit(WORKER_BOOT_ERROR)

    def _build(self) -> None:
        from sagellm.engine.choice import choose_engine
        from sagellm.engine.sampling_params import SamplingParams

        name, why = choose_engine(self.settings.engine)
        if name == "vllm":
            from sagellm.engine.choice import cuda_visible
            from sagellm.engine.vllm.load import load_vllm

            lm, engine = load_vllm(self.settings, "cuda" if cuda_visible() else "cpu")
        else:
            lm, engine = self._load_sagellm()
        # Logged once loaded: until gunicorn's post_worker_init has run, log lines may be lost.
        log.info("engine=%s (%s)", name, why)
        for line in self.settings.unhonoured(name):
            log.warning("%s", line)
        for line in lm.describe():
            log.info("%s", line)
        self.loaded, self.engine = lm, engine
        # Warm-up: one short generation through the whole path before /ping turns green.
        prompt = lm.chat.encode(lm.chat.render([{"role": "user", "content": "Hello"}])) if lm.chat.template \
            else lm.tokenizer("Hello").input_ids
        events = list(engine.submit(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)))
        if not events or events[-1].finish_reason is None or events[-1].error:
            raise RuntimeError(f"warm-up generation failed: {events[-1].error if events else 'no output'}")
        self.ctx = make_context(self.settings, lm, engine)
        from sagellm.server.handlers import Handlers

        self.handlers = Handlers(self.settings.model_dir, self.ctx)
        if lm.tp is not None:
            threading.Thread(target=self._watch_ranks, name="sagellm-ranks", daemon=True).start()
        if name == "vllm":
            threading.Thread(target=self._watch_engine, name="sagellm-watch", daemon=True).start()

    def _load_sagellm(self):
        from sagellm.engine.engine import EngineConfig, LLMEngine
        from sagellm.model import load_model

        lm = load_model(self.settings)
        lim = lm.limits
        cfg = EngineConfig(max_batch_size=lim.max_batch_size, max_prefill_tokens=lim.max_batch_prefill_tokens,
                           max_total_tokens=lim.max_total_tokens,
                           num_kv_blocks=max(1, lim.max_batch_total_tokens // 16), block_size=16,
                           prefix_caching=self.settings.prefix_caching)
        engine = LLMEngine(lm.model, lm.tokenizer, cfg, lm.eos_token_ids, device=lm.device, tp_group=lm.tp)
        engine.start()
        return lm, engine

    def _watch_engine(self) -> None:
        """vLLM's engine core runs in its own process and can die under us (killed, out of
        memory): fail /ping, shut down what is left of it, and stop the server, non-zero."""
        while self.state in ("loading", "ready"):
            if not self.engine.is_alive():
                self.state = "failed"
                self.error = "the vLLM engine core stopped"
                log.error("%s; stopping the server", self.error)
                time.sleep(1.0)  # let in-flight /ping calls see 503
                self.engine.stop(timeout=10)
                logging.shutdown()
                os._exit(WORKER_BOOT_ERROR)
            time.sleep(0.5)

    def _watch_ranks(self) -> None:
        """A dead rank can never rejoin the group: fail /ping and stop the server, non-zero."""
        tp = self.loaded.tp
        while self.state in ("loading", "ready"):
            dead = tp.dead_followers()
            if dead:
                self.state = "failed"
                self.error = f"tensor-parallel rank(s) {dead} exited"
                log.error("%s; stopping the server", self.error)
                time.sleep(1.0)  # let in-flight /ping calls see 503
                logging.shutdown()
                os._exit(WORKER_BOOT_ERROR)
            time.sleep(0.5)

    # ---- health ----

    def healthy(self) -> tuple[bool, str]:
        if self.state != "ready":
            return False, self.error or self.state
        engine = self.engine
        if not engine.is_alive():
            return False, "the engine stopped"
        stalled = time.monotonic() - engine.last_progress
        if engine.num_pending() and stalled > self.settings.watchdog_timeout_s:
            return False, f"the engine made no progress for {stalled:.0f}s with work queued"
        return True, "ok"

    def stop(self) -> None:
        self.state = "stopping"
        if self.engine is not None:
            self.engine.stop()
        if self.loaded is not None and self.loaded.tp is not None:
            self.loaded.tp.shutdown()


def make_context(settings: Settings, lm, engine) -> ServingContext:
    tok = lm.tokenizer

    def tokenize(text: str, add_special: bool) -> list[int]:
        return tok(text, add_special_tokens=add_special).input_ids

    def offsets(text: str):
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        return [(i, s, e) for i, (s, e) in zip(enc.input_ids, enc["offset_mapping"])]

    lim = lm.limits
    compile_grammar = None
    if not settings.disable_grammar_support:
        from sagellm.engine.constraint import GrammarCompiler

        compile_grammar = GrammarCompiler(tok, lm.vocab_size, engine.eos_token_ids,
                                          timeout_s=settings.grammar_compile_timeout_s).compile
    return ServingContext(
        settings=settings, model_id=lm.source.model_id, served_name=lm.served_name, device=lm.device,
        dtype=str(lm.dtype).replace("torch.", ""), max_input_tokens=lim.max_input_tokens,
        max_total_tokens=lim.max_total_tokens, max_batch_prefill_tokens=lim.max_batch_prefill_tokens,
        max_batch_total_tokens=lim.max_batch_total_tokens, max_batch_size=lim.max_batch_size,
        tokenize=tokenize, tokenize_offsets=offsets,
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        render_chat=lambda messages, **kw: lm.chat.render(messages, **kw),
        encode_chat=lm.chat.encode, submit=engine.submit, compile_grammar=compile_grammar,
        template_shows_tools=lm.chat.shows_tools)
