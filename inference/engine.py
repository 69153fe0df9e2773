"""The llama.cpp engine: one llama context, canonical evaluation, fixed-seed sampling, streaming without blocking trio.

Determinism: every generation starts from an empty context (``reset``, so llama-cpp-python's KV-cache prefix reuse
can never change the result), a fresh sampler seeded with the request's seed, and fixed sampler settings. The
determinism class of an output is the model sha256 + ``fingerprint`` (engine build, CPU features, context and
batch sizes) + the sampling parameters + the seed.

Streaming: generation runs in a worker thread; each piece of text is handed to trio through a bounded channel and
passed to the caller's ``emit``. If ``emit`` fails (the customer went away) or the caller is cancelled, the thread
stops before the next token.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import trio

from llorch.inference import catalog, limits
from llorch.inference.errors import EngineError, RequestError

# Fixed sampler settings: part of the determinism class, never taken from a request.
TOP_K = 40
MIN_P = 0.05
REPEAT_PENALTY = 1.0

STOP_POLL_S = 0.05           # the generating thread, waiting for room ahead of emit, checks this often for a stop


class GenerationStopped(Exception):
    """In the generating thread: ``emit`` failed or generation was stopped; no further piece is sent."""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters as integers: probabilities and temperature in parts per million."""

    seed: int
    temperature_ppm: int
    top_p_ppm: int
    max_tokens: int
    stop: tuple[str, ...] = ()
    json_schema: str | None = None     # structured output: the schema's JSON text, or "{}" for any JSON object
    frequency_penalty_ppm: int = 0
    presence_penalty_ppm: int = 0
    repeat_penalty_ppm: int = 1_000_000
    logprobs: int | None = None        # with logprobs: how many most likely alternatives each token lists (0..20)

    @classmethod
    def of(cls, sampling: dict) -> "Sampling":
        """From a ticket's sampling map (docs/protocol.md §3), its response_format included."""
        response_format = sampling.get("response_format")
        schema = None if response_format is None else response_format.get("schema", ANY_OBJECT)
        return cls(sampling["seed"], sampling["temperature_ppm"], sampling["top_p_ppm"], sampling["max_tokens"],
                   tuple(sampling["stop"]), schema, sampling.get("frequency_penalty_ppm", 0),
                   sampling.get("presence_penalty_ppm", 0), sampling.get("repeat_penalty_ppm", 1_000_000),
                   sampling.get("logprobs"))


ANY_OBJECT = '{"type":"object"}'       # response_format json_object: any JSON object
Piece = tuple[str, "dict | None"]      # a piece of text and, with logprobs, its token's entry


@dataclass(frozen=True)
class Prepared:
    """A request checked against this engine's limits, with its prompt tokens (and, for structured output, the
    grammar its tokens must follow). Built by ``Engine.prepare``."""

    prompt_tokens: tuple[int, ...]
    sampling: Sampling
    grammar: object | None = None      # a llama_cpp.LlamaGrammar


@dataclass(frozen=True)
class Generation:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str          # "stop" | "length" | "cancelled"
    logprobs: tuple[dict, ...] = ()     # with logprobs: one entry per generated token (docs/protocol.md §6)


Emit = Callable[..., Awaitable[None]]
"""``emit(text, logprobs=None)``: one piece of text and, when the ticket asks for logprobs, its token's entry."""


def _llama_cpp():
    import llama_cpp  # imported lazily: loading the native library costs time and memory

    return llama_cpp


def determinism_class(model_sha256_hex: str, fingerprint: str) -> str:
    """A short name for a determinism class: outputs are byte-identical between engines of the same class (given
    the same prompt, sampling parameters and seed)."""
    return "dc1-" + hashlib.sha256(f"{model_sha256_hex}\n{fingerprint}".encode()).hexdigest()[:16]


def parse_fingerprint(fingerprint: str) -> dict[str, str]:
    """The parts of an engine build fingerprint, e.g. {"llama-cpp-python": "0.3.36", "ctx": "2048", ...}."""
    parts = {}
    for item in fingerprint.split(";"):
        name, _, value = item.partition("/")
        parts[name] = value
    return parts


def build_fingerprint(context_tokens: int, batch_tokens: int, gpu_layers: int = 0) -> str:
    """Engine build fingerprint: binding version, ggml's feature set (its system info: CPU features, and the GPU
    backend of a CUDA or Metal build), context and batch sizes, and, when layers are offloaded to a GPU, how many.
    A GPU node's fingerprint (so its determinism class) never equals a CPU node's: their float arithmetic differs.
    Raises EngineError if ``gpu_layers`` is asked of a build that cannot offload."""
    llama_cpp = _llama_cpp()
    if gpu_layers and not llama_cpp.llama_supports_gpu_offload():
        raise EngineError(f"node.gpu_layers = {gpu_layers}, but this llama-cpp-python build has no GPU backend: "
                          f"rebuild it with CMAKE_ARGS=\"-DGGML_CUDA=on\" (NVIDIA) or \"-DGGML_METAL=on\" (Apple), "
                          f"or set gpu_layers = 0")
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    features = hashlib.sha256(system_info.encode()).hexdigest()[:16]
    offload = f";gpu-layers/{gpu_layers}" if gpu_layers else ""
    return (f"llama-cpp-python/{llama_cpp.__version__};ggml-cpu/{features};ctx/{context_tokens};batch/{batch_tokens}"
            f"{offload}")


class Engine:
    """One llama.cpp context serving one generation at a time. Load with ``Engine.load``."""

    def __init__(self, entry: catalog.CatalogEntry, path: Path, threads: int, context_tokens: int,
                 batch_tokens: int, gpu_layers: int = 0) -> None:
        llama_cpp = _llama_cpp()
        from llama_cpp import llama_chat_format

        self.entry = entry
        self.context_tokens = context_tokens
        try:
            self._llm = llama_cpp.Llama(str(path), n_ctx=context_tokens, n_batch=batch_tokens, n_threads=threads,
                                        n_threads_batch=threads, n_gpu_layers=gpu_layers, seed=0, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"llama.cpp could not load {path}: {exc}") from None
        # a base model serves raw completions only: it never formats a chat
        self._format: Callable[..., llama_chat_format.ChatFormatterResponse] | None = None
        if entry.chat_format is not None:
            self._format = getattr(llama_chat_format, f"format_{entry.chat_format.replace('-', '_')}", None)
            if self._format is None:
                raise EngineError(f"chat format {entry.chat_format!r} of {entry.id} is not in this llama-cpp-python")
        self._vocab = self._llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._busy = threading.Lock()
        self.fingerprint = build_fingerprint(context_tokens, batch_tokens, gpu_layers)
        self.determinism_class = determinism_class(entry.sha256, self.fingerprint)

    @classmethod
    def load(cls, model_id: str, cache_dir: Path | None = None, threads: int = 2,
             context_tokens: int = limits.CONTEXT_TOKENS_DEFAULT,
             batch_tokens: int = limits.BATCH_TOKENS_DEFAULT, gpu_layers: int = 0) -> "Engine":
        """Check the cached file against its pinned sha256 and its declared kind, then load it."""
        entry = catalog.lookup(model_id)
        path = catalog.verified_path(entry, cache_dir)
        build_fingerprint(context_tokens, batch_tokens, gpu_layers)      # a build that cannot offload: say so now
        return cls(entry, path, threads, context_tokens, batch_tokens, gpu_layers)

    def prepare(self, prompt: dict, sampling: Sampling) -> Prepared:
        """Validate a request and tokenize its prompt; raise RequestError before doing any work.

        ``prompt`` is {"messages": [...]} (a chat, formatted with the catalog's chat format) or {"text": str}
        (a raw completion prompt, tokenized as is).
        """
        if not 0 < sampling.max_tokens <= limits.MAX_TOKENS_CAP:
            raise RequestError(f"max_tokens must be in 1..{limits.MAX_TOKENS_CAP}, got {sampling.max_tokens}")
        if "text" in prompt:
            text = prompt["text"]
            if not 0 < len(text) <= limits.PROMPT_CHARS_MAX:
                raise RequestError(f"a completion prompt needs 1..{limits.PROMPT_CHARS_MAX} characters")
        else:
            check_serves_chat(self.entry)
            assert self._format is not None         # a model that serves chat has a chat format (__init__)
            messages = prompt["messages"]
            if not 0 < len(messages) <= limits.MESSAGES_MAX:
                raise RequestError(f"a chat request needs 1..{limits.MESSAGES_MAX} messages, got {len(messages)}")
            if sum(len(m.get("content", "")) for m in messages) > limits.PROMPT_CHARS_MAX:
                raise RequestError(f"the messages exceed {limits.PROMPT_CHARS_MAX} characters")
            text = self._format(messages=messages).prompt
        # add_bos=True means "as the model's metadata says": Gemma gets its <bos>, SmolLM2 (add_bos_token false)
        # gets nothing; without <bos> Gemma's output is garbage.
        tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=True, special="text" not in prompt)
        if len(tokens) + sampling.max_tokens > self.context_tokens:
            raise RequestError(
                f"the prompt is {len(tokens)} tokens and max_tokens is {sampling.max_tokens}: together they exceed "
                f"this engine's context of {self.context_tokens} tokens")
        return Prepared(tuple(tokens), sampling, grammar_of(sampling.json_schema))

    async def generate(self, prepared: Prepared, emit: Emit) -> Generation:
        """Generate, passing each new piece of text (and its token's logprobs entry, when asked) to ``emit`` as it is
        produced; return the whole result."""
        send, receive = trio.open_memory_channel[Piece](limits.TOKEN_PIECES_AHEAD_MAX)
        stop_requested = threading.Event()
        room = threading.Semaphore(limits.TOKEN_PIECES_AHEAD_MAX)
        trio_token = trio.lowlevel.current_trio_token()
        emit_failed = False

        def hand_over(piece: Piece) -> None:             # in trio's thread, as soon as the event loop gets to it
            try:
                send.send_nowait(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                stop_requested.set()

        def send_piece(piece: Piece) -> None:
            """From the engine's thread: queue ``piece`` for ``emit`` without waiting for the event loop, which may
            be busy framing and sending the last piece (waiting for it cost every token that hand-off: 3% of the
            engine's rate on a busy node); wait only while TOKEN_PIECES_AHEAD_MAX pieces are not emitted yet."""
            while not room.acquire(timeout=STOP_POLL_S):
                if stop_requested.is_set():
                    raise GenerationStopped()
            if stop_requested.is_set():
                room.release()
                raise GenerationStopped()
            trio_token.run_sync_soon(hand_over, piece)

        delivered: list[Piece] = []          # the pieces emit took: a cancelled result is exactly these

        async def pump() -> None:
            # If emit fails (the reader is gone), the thread stops before sampling another token (it checks
            # ``stop_requested`` at every token); the result then says "cancelled".
            nonlocal emit_failed
            async with receive:
                async for piece in receive:
                    try:
                        await emit(*piece) if piece[1] is not None else await emit(piece[0])
                    except Exception:
                        emit_failed = True
                        stop_requested.set()
                        return
                    delivered.append(piece)
                    room.release()

        async def run_thread() -> Generation:
            try:
                return await trio.to_thread.run_sync(self._generate_blocking, prepared, send_piece, stop_requested)
            finally:
                await send.aclose()      # after every piece the thread queued: run_sync_soon keeps their order

        result: list[Generation] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)

                async def runner() -> None:
                    result.append(await run_thread())
                nursery.start_soon(runner)
        finally:
            stop_requested.set()
        generation = result[0]
        if emit_failed and generation.finish_reason != "cancelled":
            generation = dataclasses.replace(generation, finish_reason="cancelled")    # it ended before it noticed
        if generation.finish_reason == "cancelled":
            # The thread counted the pieces emit never took (the one it refused, and up to TOKEN_PIECES_AHEAD_MAX
            # queued behind it): the receipt must cover only what was delivered, one token per piece, so its
            # output hash matches the frames and its count never exceeds them.
            entries = tuple(entry for _, entry in delivered if entry is not None)
            generation = dataclasses.replace(generation, text="".join(text for text, _ in delivered),
                                             tokens_out=min(generation.tokens_out, len(delivered)),
                                             logprobs=entries if prepared.sampling.logprobs is not None else ())
        return generation

    def _generate_blocking(self, prepared: Prepared, send_piece: Callable[[Piece], None],
                           stop_requested: threading.Event) -> Generation:
        if not self._busy.acquire(blocking=False):
            raise AssertionError("Engine.generate called while another generation runs on this context")
        try:
            return self._generate_locked(prepared, send_piece, stop_requested)
        finally:
            self._busy.release()

    def _generate_locked(self, prepared: Prepared, send_piece: Callable[[Piece], None],
                         stop_requested: threading.Event) -> Generation:
        sampling = prepared.sampling
        llm = self._llm
        llm.reset()              # canonical evaluation: never reuse a previous prompt's KV cache
        llm.set_seed(sampler_seed(sampling.seed))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted, tokens_out, finish, cut = "", 0, 0, "length", None
        entries: list[dict] = []

        def send(upto: int, entry: dict | None = None) -> bool:
            """Send text[emitted:upto] (possibly empty): exactly one piece per generated token, so the gateway can
            bound the billed output tokens by the token texts it relayed."""
            nonlocal emitted
            try:
                send_piece((text[emitted:upto], entry))
            except BaseException:  # receiver gone or cancelled: stop generating; this token was not delivered
                return False
            emitted = max(emitted, upto)
            if entry is not None:
                entries.append(entry)
            return True

        try:
            generator = llm.generate(list(prepared.prompt_tokens), top_k=TOP_K, top_p=sampling.top_p_ppm / 1e6,
                                     min_p=MIN_P, temp=sampling.temperature_ppm / 1e6,
                                     repeat_penalty=sampling.repeat_penalty_ppm / 1e6,
                                     frequency_penalty=sampling.frequency_penalty_ppm / 1e6,
                                     presence_penalty=sampling.presence_penalty_ppm / 1e6, grammar=prepared.grammar)
            for token in generator:
                if stop_requested.is_set():
                    finish = "cancelled"
                    break
                if self._is_eog(self._vocab, token):
                    finish = "stop"
                    break
                text += decoder.decode(llm.detokenize([token]))
                cut = _first_stop(text, sampling.stop, emitted)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                upto = len(text) if cut is not None else len(text) - _held_back(text, sampling.stop)
                entry = None if sampling.logprobs is None else self._logprobs_entry(token, sampling.logprobs)
                if not send(upto, entry):
                    finish = "cancelled"
                    break
                tokens_out += 1
                if cut is not None or tokens_out >= sampling.max_tokens:
                    break
            generator.close()
        except (RuntimeError, ValueError, OSError) as exc:
            raise EngineError(f"llama.cpp failed while generating: {exc}") from None
        if finish != "cancelled":
            if cut is None:                # text after a stop string is never part of the output
                text += decoder.decode(b"", final=True)
            if len(text) > emitted and not send(len(text)):     # held-back text: one last piece, no new token
                finish = "cancelled"
        return Generation(text[:emitted] if finish == "cancelled" else text, len(prepared.prompt_tokens),
                          tokens_out, finish, tuple(entries))

    def _logprobs_entry(self, token: int, top: int) -> dict:
        """The logprobs entry of a token just sampled: its log-probability under the model's distribution at that
        step (the logits llama.cpp sampled from, before temperature, top-k/p, penalties or a grammar), and the
        ``top`` most likely tokens (ties by token id), each in millionths rounded half to even, at least
        limits.LOGPROB_MICRO_MIN. Computed in float64 from the float32 logits, so engines of one determinism class
        agree."""
        import numpy

        llama_cpp = _llama_cpp()
        vocab_size = llama_cpp.llama_vocab_n_tokens(self._vocab)
        logits = numpy.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1),
                                          shape=(vocab_size,)).astype(numpy.float64)
        peak = logits.max()
        logprobs = logits - (peak + numpy.log(numpy.exp(logits - peak).sum()))
        best: list[int] = []
        if top:
            floor = numpy.partition(logprobs, vocab_size - top)[vocab_size - top]     # the top-th largest
            near = numpy.flatnonzero(logprobs >= floor)                               # with its ties
            best = [int(near[i]) for i in numpy.lexsort((near, -logprobs[near]))[:top]]

        def micro(value: float) -> int:
            return max(limits.LOGPROB_MICRO_MIN, min(0, round(float(value) * 1_000_000))) if numpy.isfinite(value) \
                else limits.LOGPROB_MICRO_MIN

        def token_bytes(token_id: int) -> bytes:
            return self._llm.detokenize([int(token_id)])[:limits.LOGPROB_TOKEN_BYTES_MAX]

        return {"token": token_bytes(token), "logprob": micro(logprobs[token]),
                "top": [[token_bytes(other), micro(logprobs[other])] for other in best]}


def grammar_of(json_schema: str | None):
    """The llama.cpp grammar that constrains the output to JSON valid against ``json_schema`` (None: no grammar);
    RequestError if llama.cpp cannot build one from it."""
    if json_schema is None:
        return None
    from llama_cpp import LlamaGrammar
    from llama_cpp._utils import suppress_stdout_stderr

    try:
        with suppress_stdout_stderr(disable=False):
            return LlamaGrammar.from_json_schema(json_schema, verbose=False)
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise RequestError(f"llama.cpp cannot build a grammar from the response_format schema: {exc}") from None


SAMPLER_SEED_MODULUS = 2**32 - 1


def sampler_seed(seed: int) -> int:
    """The seed llama.cpp's sampler gets for a ticket's ``seed`` (any uint64): ``seed mod (2^32 - 1)``. llama.cpp
    takes 32 bits and treats 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as "pick a random seed", so passing the ticket's seed
    as it is would make every seed ≡ 2^32 - 1 (mod 2^32) sample at random: an honest provider's re-run would differ
    from its first run. Seeds below 2^32 - 1 map to themselves."""
    return seed % SAMPLER_SEED_MODULUS


def check_serves_chat(entry: catalog.CatalogEntry) -> None:
    """Raise RequestError for a chat request on a base model: it has no chat template and would answer gibberish."""
    if not entry.serves_chat:
        raise RequestError(f"{entry.id} is a base model (not instruction-tuned): it serves raw completions only; "
                           f"send a prompt to /v1/completions")


def _first_stop(text: str, stops: tuple[str, ...], search_from: int) -> int | None:
    """Index where the earliest stop string starts in text (searching only where it can newly appear)."""
    best = None
    for stop in stops:
        index = text.find(stop, max(0, search_from - len(stop) + 1))
        if index >= 0 and (best is None or index < best):
            best = index
    return best


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string (so is not sent yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
