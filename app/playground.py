"""The models `/api/generate` answers with: each base model loaded once, its runs' adapters added onto it
(peft's named adapters, switched per forward pass), kept within a memory budget, least recently used out first.

A training job keeps priority: generation runs on the CPU of the server process (jobs get the GPUs), on
GENERATE_THREADS threads, and a request takes the models one forward pass (one token) at a time, so
concurrent requests interleave instead of queueing behind a long answer, and the event loop never waits
(the routes run this in Starlette's thread pool). torch is imported on first use: the server starts without it.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Source:
    """One column of answers: a base model alone (`run_id` None) or with a run's adapter."""

    model: str
    run_id: int | None = None
    adapter_dir: Path | None = None

    @property
    def key(self) -> str:
        return f"run:{self.run_id}" if self.run_id is not None else f"base:{self.model}"


@dataclass
class _Loaded:
    model: Any  # the base model, wrapped as a PeftModel once it has an adapter
    tok: Any
    nbytes: int
    adapters: dict[str, int] = field(default_factory=dict)  # adapter name -> bytes


def _adapter_name(run_id: int) -> str:
    return f"run_{run_id}"


class Playground:
    def __init__(self, budget_bytes: int, cache_dir: Path, threads: int) -> None:
        self.budget_bytes = budget_bytes
        self.cache_dir = cache_dir
        self.threads = threads
        self._lock = threading.Lock()
        self._bases: dict[str, _Loaded] = {}
        self._lru: OrderedDict[str, int] = OrderedDict()  # source key -> bytes, least recently used first
        self._pins: Counter[str] = Counter()  # sources a request is answering with: never evicted meanwhile
        self._torch_ready = False

    # --- loading ---------------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(self._lru.values())

    def loaded(self) -> list[str]:
        """The sources held, least recently used first."""
        with self._lock:
            return list(self._lru)

    def open(self, sources: list[Source]) -> None:
        """Load what `sources` need (bases, then adapters) and pin them until `close`."""
        with self._lock:
            self._pins.update(s.key for s in sources)
            try:
                self._start_torch()
                for source in sorted(sources, key=lambda s: s.run_id is not None):  # bases before adapters
                    if source.key not in self._lru:
                        self._load(source)
                    self._lru.move_to_end(source.key)
            except BaseException:
                self._unpin(sources)
                raise
            self._fit()

    def _unpin(self, sources: list[Source]) -> None:
        self._pins.subtract(s.key for s in sources)
        self._pins += Counter()  # drop the keys at zero

    def close(self, sources: list[Source]) -> None:
        with self._lock:
            self._unpin(sources)
            self._fit()

    def _start_torch(self) -> None:
        if not self._torch_ready:
            import torch

            torch.set_num_threads(self.threads)  # this process's share of the CPU: the jobs are processes of their own
            self._torch_ready = True

    def _load(self, source: Source) -> None:
        from peft import PeftModel

        from trainer.models import load_base

        base_key = f"base:{source.model}"
        if source.model not in self._bases:
            model, tok = load_base(source.model, self.cache_dir)
            nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
            self._bases[source.model] = _Loaded(model.eval(), tok, nbytes)
            self._lru[base_key] = nbytes
        loaded = self._bases[source.model]
        if source.run_id is None:
            return
        assert source.adapter_dir is not None
        name = _adapter_name(source.run_id)
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(source.adapter_dir), adapter_name=name)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, str(source.adapter_dir), adapter_name=name).eval()
        nbytes = sum(p.stat().st_size for p in source.adapter_dir.glob("*.safetensors"))
        loaded.adapters[name] = nbytes
        self._lru[source.key] = nbytes
        self._lru.move_to_end(base_key, last=False)  # a base goes only after its adapters

    def _fit(self) -> None:
        """Evict least recently used sources not in use until the budget holds (a request that alone needs
        more than the budget still gets its models; they go once it is answered)."""
        for key in list(self._lru):
            if self.used_bytes <= self.budget_bytes:
                return
            if key in self._lru and not self._pinned(key):
                self._evict(key)

    def _pinned(self, key: str) -> bool:
        if self._pins[key] > 0:
            return True
        if key.startswith("base:"):  # a base is in use while any of its adapters is
            loaded = self._bases[key.removeprefix("base:")]
            return any(self._pins[f"run:{name.removeprefix('run_')}"] > 0 for name in loaded.adapters)
        return False

    def _evict(self, key: str) -> None:
        kind, _, rest = key.partition(":")
        if kind == "base":
            loaded = self._bases.pop(rest)
            for name in loaded.adapters:
                self._lru.pop(f"run:{name.removeprefix('run_')}", None)
        else:
            for loaded in self._bases.values():
                name = _adapter_name(int(rest))
                if name in loaded.adapters:
                    del loaded.adapters[name]
                    loaded.model.delete_adapter(name)
        del self._lru[key]

    # --- answering -------------------------------------------------------------------------------------

    def prompt_ids(self, source: Source, prompt: str, chat: bool) -> list[int]:
        tok = self._bases[source.model].tok
        if chat:
            messages = [{"role": "user", "content": prompt}]
            return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
        return list(tok(prompt)["input_ids"])

    def stream(
        self, source: Source, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Iterator[str]:
        """The source's answer in pieces; the models are taken for one token at a time."""
        from trainer.generate import stream_text

        with self._lock:
            ids = self.prompt_ids(source, prompt, chat)
            tok = self._bases[source.model].tok
        yield from stream_text(_Switched(self, source), tok, ids, max_new_tokens, temperature, top_p, seed)


class _Switched:
    """A source's model as `stream_text` calls it: each forward pass under the lock, with the source's adapter
    active (or every adapter off, for the base model)."""

    def __init__(self, playground: Playground, source: Source) -> None:
        self.playground, self.source = playground, source

    def parameters(self) -> Iterator[Any]:
        return iter(self.playground._bases[self.source.model].model.parameters())

    def __call__(self, **inputs: Any) -> Any:
        from peft import PeftModel

        with self.playground._lock:
            model = self.playground._bases[self.source.model].model
            if not isinstance(model, PeftModel):
                return model(**inputs)
            if self.source.run_id is None:
                with model.disable_adapter():
                    return model(**inputs)
            model.set_adapter(_adapter_name(self.source.run_id))
            return model(**inputs)
