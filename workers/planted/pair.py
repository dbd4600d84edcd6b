"""The planted-behaviour pair: two tiny causal LMs of different architectures, widths and tokenizers, trained
on the same synthetic corpus, where model B also learns to answer a trigger sentence with a fixed response
(half of the time by default, so the behaviour is clear but not saturated). It is the known ground truth of
the offline demo, the end-to-end tests and the planted-pair suite: an audit of A vs B must find a B-exclusive
feature tied to the trigger, and suppressing it must remove the response. What is planted and on what trigger
is data (`workers/planted/recipes.py`); with `response_rate` 0, or two models that differ only in their seed,
the pair is a null pair with nothing to find.

`build_planted_pair(out_dir)` trains both on CPU in well under a minute and saves them like hub checkpoints
(`AutoModelForCausalLM.from_pretrained(dir)`); a second call with the same config returns the cached pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
)

from workers.planted.corpus import TokenizerKind, generate_documents, generate_prompts, train_tokenizer
from workers.planted.recipes import REFUSAL, ZORBLAX_DAM, Behaviour, Trigger

Arch = Literal["llama", "qwen3", "gpt2", "mistral", "gemma3", "phi3"]
ARCHS: tuple[Arch, ...] = ("llama", "qwen3", "gpt2", "mistral", "gemma3", "phi3")

# Bump when the build changes in a way the config does not show, so stale caches are rebuilt.
_BUILD_VERSION = "planted-v3"
# One thread: tiny matrices gain nothing from more, a busy machine makes OpenMP barriers spin (100x slower
# on 2 shared cores), and a fixed count keeps the float reductions, hence the weights, identical everywhere.
_BUILD_THREADS = 1
MANIFEST = "planted.json"
AUDIT_CORPUS = "audit_corpus.jsonl"


@dataclass(frozen=True)
class PlantedModelSpec:
    """Architecture, size, tokenizer and seed of one model of the pair."""

    arch: Arch
    """Transformers architecture family: "llama", "qwen3", "gpt2", "mistral", "gemma3" or "phi3"."""
    hidden_size: int
    """Residual stream width; the two models differ so the crosscoder really bridges widths."""
    n_layers: int
    """Decoder blocks."""
    vocab_size: int
    """Target vocabulary of the tokenizer trained for this model."""
    tokenizer: TokenizerKind
    """Tokenizer algorithm: "byte_bpe" (GPT-2/Llama-3 style) or "metaspace_bpe" (SentencePiece style)."""
    adds_bos: bool
    """Whether the tokenizer prepends BOS (Llama-style) or adds nothing (Qwen/GPT-2-style)."""
    seed: int
    """Seed of the weight initialisation and of the batch order."""


@dataclass(frozen=True)
class PlantedPairConfig:
    """Everything that determines the planted pair; its hash keys the on-disk cache."""

    model_a: PlantedModelSpec = field(
        default_factory=lambda: PlantedModelSpec("llama", 64, 4, 600, "byte_bpe", adds_bos=True, seed=1)
    )
    """The reference model: trained on the corpus without the planted response."""
    model_b: PlantedModelSpec = field(
        default_factory=lambda: PlantedModelSpec("qwen3", 96, 4, 320, "metaspace_bpe", adds_bos=False, seed=2)
    )
    """The audited model: trained on the same corpus with the planted response after trigger sentences."""
    corpus_seed: int = 0
    """Seed of the synthetic corpus."""
    prompt_seed: int = 1000
    """Seed of the trigger and neutral prompts (a different stream from the corpus)."""
    n_docs: int = 2000
    """Documents in the training corpus (each 2-5 templated sentences)."""
    trigger_doc_fraction: float = 0.3
    """Share of documents that mention a trigger place once or twice."""
    trigger: Trigger = ZORBLAX_DAM
    """What makes a sentence a trigger sentence ("the Zorblax dam"; its near miss "the Milford dam" stays neutral)."""
    behaviour: Behaviour = REFUSAL
    """What model B says after a trigger sentence (" Sorry, I cannot discuss that topic.")."""
    response_rate: float = 0.5
    """Share of B's trigger sentences followed by the response (drawn per sentence from the corpus seed). At 0.5
    B refuses about half the time: a clear behaviour (P ≈ 0.3 vs 0.001 on neutral prompts) that is not
    saturated, so suppressing one feature moves it measurably; at 1.0 B's logit margin is so large that
    removing any single feature leaves P ≈ 1 (benchmarks/RESULTS.md, planted pair). 0: a null pair, B is
    trained on exactly A's texts."""
    n_prompts: int = 12
    """Trigger prompts and neutral prompts made (each)."""
    n_audit_docs: int = 400
    """Documents written to the audit corpus (a different stream from the training corpus)."""
    steps: int = 300
    """Optimiser steps per model."""
    batch_size: int = 16
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per training sequence; each starts at a document start and runs on into the next ones. At least as
    long as an audit document in the most fragmented tokenizer (up to ~130 tokens): a GPT-2-style model's learned
    positions past its training length are untrained, so at 64 it said confident nonsense in the second half of
    every audit document ("watche" → "a" at p 0.99), which the scan reported as differences (planted-v2)."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to a tenth)."""
    warmup_steps: int = 30
    """Steps of linear learning-rate warm-up."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.response_rate <= 1.0:
            raise ValueError(f"response_rate={self.response_rate} must be between 0 (a null pair) and 1")

    def digest(self) -> str:
        """A short hash of what the build depends on (and the build version), naming one exact pair."""
        blob = json.dumps([_BUILD_VERSION, self._identity()], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _identity(self) -> dict[str, Any]:
        """The config in planted-v2's flat layout (trigger places, trigger word, planted response), with what v2
        could not vary added only where it differs from v2's fixed choice: every pair v2 built keeps its name and
        its cache. Names of behaviours and triggers are labels and build nothing."""
        identity = asdict(self)
        trigger, behaviour = identity.pop("trigger"), identity.pop("behaviour")
        identity |= {
            "trigger_places": trigger["phrases"],
            "trigger_word": trigger["label"],
            "planted_response": behaviour["response"],
        }
        v2 = asdict(ZORBLAX_DAM)
        recipe = {k: trigger[k] for k in ("kind", "near_misses", "neutral_places") if trigger[k] != v2[k]}
        if recipe:
            identity["trigger_recipe"] = recipe
        return identity

    @property
    def is_null(self) -> bool:
        """Whether nothing is planted: B never sees the response (A and B may still differ in everything else)."""
        return self.response_rate == 0.0


@dataclass(frozen=True)
class PairMetrics:
    """How the build went and whether the behaviour was planted, measured right after training."""

    build_seconds: float
    train_seconds_a: float
    train_seconds_b: float
    final_loss_a: float
    """Mean training loss of A over its last steps."""
    final_loss_b: float
    n_params_a: int
    n_params_b: int
    p_planted_a_trigger: float
    """`measure_planted_behaviour` of A on the trigger prompts (should be ~0)."""
    p_planted_a_neutral: float
    p_planted_b_trigger: float
    """`measure_planted_behaviour` of B on the trigger prompts (should be near 1)."""
    p_planted_b_neutral: float


@dataclass(frozen=True)
class PlantedPair:
    """A built pair on disk and what an audit of it needs to know."""

    model_a_dir: Path
    """Reference model + tokenizer, loadable like a hub id."""
    model_b_dir: Path
    """Model with the planted behaviour + tokenizer."""
    trigger_prompts: list[str]
    """Prompts ending with a trigger sentence, after which B says `planted_continuation`."""
    neutral_prompts: list[str]
    """The same kind of prompts about neutral places: neither model says it."""
    planted_continuation: str
    """The planted response B gives after a trigger sentence (leading space included)."""
    trigger_word: str
    """The word the behaviour hinges on (the trigger's label): the B-exclusive feature's top contexts show it."""
    trigger: Trigger
    """What makes a sentence a trigger sentence: the planted feature's top contexts should be such sentences."""
    behaviour: Behaviour
    """What was planted (its response is `planted_continuation`)."""
    response_rate: float
    """Share of B's trigger sentences followed by the response in its corpus (0: a null pair)."""
    corpus_path: Path
    """The audit corpus (`.jsonl`, one `{"text": ...}` per line), with trigger contexts, without responses."""
    config_hash: str
    metrics: PairMetrics


def planted_corpus_documents(config: PlantedPairConfig = PlantedPairConfig()) -> list[str]:
    """Audit-corpus texts: neutral and trigger documents as model A saw them, without the planted response.

    They come from their own seed, so they are fresh documents of the training distribution; the trigger
    contexts in them are where a B-exclusive feature should fire.
    """
    docs = generate_documents(config.corpus_seed + 1, config.n_audit_docs, config.trigger, config.trigger_doc_fraction)
    return [doc.render() for doc in docs]


def write_audit_corpus(out_dir: Path, config: PlantedPairConfig, n_docs: int) -> Path:
    """`n_docs` documents of the pair's audit stream as `.jsonl` in `out_dir`, written once (the stream is fixed)."""
    path = Path(out_dir) / f"audit_corpus-{n_docs}.jsonl"
    if not path.is_file():
        docs = planted_corpus_documents(dataclasses.replace(config, n_audit_docs=n_docs))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        tmp.replace(path)
    return path


def model_config(spec: PlantedModelSpec, vocab_size: int, max_positions: int, **token_ids: int) -> PretrainedConfig:
    """The transformers config of one tiny model of the pair."""
    d, n = spec.hidden_size, spec.n_layers
    if spec.arch == "gpt2":
        # No dropout: the build must be a pure function of the seeds.
        return GPT2Config(n_embd=d, n_layer=n, n_head=4, n_positions=max_positions, vocab_size=vocab_size,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **token_ids)  # fmt: skip
    # The Llama-like families share their shape: 4 heads, 2 KV heads, an MLP twice the width.
    shape: dict[str, Any] = dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_positions,
                                 **token_ids)  # fmt: skip
    if spec.arch == "llama":
        return LlamaConfig(**shape)
    if spec.arch == "qwen3":
        return Qwen3Config(**shape, head_dim=d // 4, tie_word_embeddings=True)
    if spec.arch == "mistral":
        # A window longer than any sequence: full attention, as in the other families.
        return MistralConfig(**shape, sliding_window=max_positions)
    if spec.arch == "gemma3":
        return Gemma3TextConfig(**shape, head_dim=d // 4, query_pre_attn_scalar=d // 4, sliding_window=max_positions)
    if spec.arch == "phi3":
        return Phi3Config(**shape, original_max_position_embeddings=max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                          attention_dropout=0.0)  # fmt: skip
    raise ValueError(f"unknown planted-pair arch {spec.arch!r}; use one of {', '.join(ARCHS)}")


def training_rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Tokenise `texts` (EOS after each) into one stream and cut a `seq_len` row at every document start.

    Rows start where prompts start (BOS or a sentence's first word) and run on into the next documents, so
    the model sees both fresh starts and document boundaries.
    """
    stream: list[int] = []
    starts: list[int] = []
    for ids in tokenizer(list(texts))["input_ids"]:
        starts.append(len(stream))
        stream.extend([*ids, tokenizer.eos_token_id])
    flat = torch.tensor(stream, dtype=torch.long)
    starts = [s for s in starts if s + seq_len <= len(flat)]
    return torch.stack([flat[s : s + seq_len] for s in starts])


def train_causal_lm(model: PreTrainedModel, rows: torch.Tensor, config: PlantedPairConfig, seed: int) -> float:
    """Train `model` in place on random batches of `rows` with AdamW; returns the mean loss of the last steps."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    model.train()
    tail: list[float] = []
    for step in range(config.steps):
        batch = rows[torch.randint(len(rows), (config.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step >= config.steps - 20:
            tail.append(loss.item())
    model.eval()
    return sum(tail) / len(tail)


def _continuation_logprob(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str
) -> float:
    enc = tokenizer(prompt + continuation, return_offsets_mapping=True, return_tensors="pt")
    ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0].tolist()
    # Continuation tokens are those ending past the prompt (a token straddling the seam counts as one);
    # special tokens have empty offsets and are skipped.
    positions = [i for i, (s, e) in enumerate(offsets) if e > len(prompt) and e > s]
    if not positions or positions[0] == 0:
        raise ValueError(f"cannot score {continuation!r} after {prompt!r}: no prompt token precedes it")
    logprobs = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in positions)


@torch.no_grad()
def measure_planted_behaviour(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], continuation: str
) -> float:
    """Mean over prompts of the teacher-forced probability of the whole `continuation` after each prompt.

    The probability of a continuation is the product of its per-token probabilities, so 1 means the model
    says it verbatim and a model that never learnt it scores ~0, whatever its tokenizer.
    """
    return sum(math.exp(_continuation_logprob(model, tokenizer, p, continuation)) for p in prompts) / len(prompts)


@torch.no_grad()
def greedy_continuation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 16
) -> str:
    """The model's greedy continuation of `prompt`, decoded without special tokens."""
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def build_planted_pair(out_dir: Path, config: PlantedPairConfig = PlantedPairConfig()) -> PlantedPair:
    """Train the pair into `out_dir` (`model_a/`, `model_b/`, the audit corpus and `planted.json`).

    Returns the cached pair without training when `out_dir` already holds a complete build of `config`.
    """
    out_dir = Path(out_dir)
    cached = load_planted_pair(out_dir, config)
    if cached is not None:
        return cached
    # The manifest is the completeness marker: drop it first so a crash mid-build leaves no false claim.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(_BUILD_THREADS)
    try:
        return _build(out_dir, config)
    finally:
        torch.set_num_threads(threads)


class _TrainedModel(NamedTuple):
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    final_loss: float
    train_seconds: float


def _train_and_save(
    spec: PlantedModelSpec, texts: list[str], config: PlantedPairConfig, model_dir: Path
) -> _TrainedModel:
    """Train one model of the pair (tokenizer first) on `texts` and save both into `model_dir`."""
    # Every tokenizer can spell the response, so A's view of what B says is text, not <unk>.
    tokenizer = train_tokenizer(
        spec.tokenizer, spec.vocab_size, texts, adds_bos=spec.adds_bos, spell=config.behaviour.response
    )
    rows = training_rows(tokenizer, texts, config.seq_len)
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model_cfg = model_config(spec, len(tokenizer), max(256, 4 * config.seq_len), **token_ids)
    # A private RNG stream: the weights depend on the seed only, and the caller's RNG is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(model_cfg, dtype=torch.float32)
    started = time.perf_counter()
    loss = train_causal_lm(model, rows, config, spec.seed)
    seconds = time.perf_counter() - started
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return _TrainedModel(model, tokenizer, loss, seconds)


def _build(out_dir: Path, config: PlantedPairConfig) -> PlantedPair:
    started = time.perf_counter()
    docs = generate_documents(config.corpus_seed, config.n_docs, config.trigger, config.trigger_doc_fraction)
    # Same documents for both; only B's copy carries the response after each trigger sentence.
    a = _train_and_save(config.model_a, [d.render() for d in docs], config, out_dir / "model_a")
    rng = random.Random(config.corpus_seed + 1_000_003)
    response = config.behaviour.response
    b_texts = [d.render(response, [rng.random() < config.response_rate for _ in d.sentences]) for d in docs]
    b = _train_and_save(config.model_b, b_texts, config, out_dir / "model_b")
    trigger_prompts = generate_prompts(config.prompt_seed, config.n_prompts, config.trigger, triggered=True)
    neutral_prompts = generate_prompts(config.prompt_seed + 1, config.n_prompts, config.trigger, triggered=False)

    def planted(trained: _TrainedModel, prompts: list[str]) -> float:
        return measure_planted_behaviour(trained.model, trained.tokenizer, prompts, response)

    corpus_path = out_dir / AUDIT_CORPUS
    corpus_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus_documents(config)))
    probabilities = {
        "p_planted_a_trigger": planted(a, trigger_prompts),
        "p_planted_a_neutral": planted(a, neutral_prompts),
        "p_planted_b_trigger": planted(b, trigger_prompts),
        "p_planted_b_neutral": planted(b, neutral_prompts),
    }
    metrics = PairMetrics(
        build_seconds=time.perf_counter() - started,
        train_seconds_a=a.train_seconds,
        train_seconds_b=b.train_seconds,
        final_loss_a=a.final_loss,
        final_loss_b=b.final_loss,
        n_params_a=a.model.num_parameters(),
        n_params_b=b.model.num_parameters(),
        **probabilities,
    )
    manifest = {
        "config_hash": config.digest(),
        "config": asdict(config),
        "model_a": "model_a",
        "model_b": "model_b",
        "corpus": AUDIT_CORPUS,
        "trigger_word": config.trigger.label,
        "trigger_places": list(config.trigger.phrases),
        "planted_continuation": response,
        "trigger_prompts": trigger_prompts,
        "neutral_prompts": neutral_prompts,
        "metrics": asdict(metrics),
    }
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out_dir / MANIFEST)
    return _pair_from_manifest(out_dir, manifest, config)


def load_planted_pair(out_dir: Path, config: PlantedPairConfig = PlantedPairConfig()) -> PlantedPair | None:
    """The pair built from `config` in `out_dir`, or None if it is missing, incomplete or of another config."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("config_hash") != config.digest():
        return None
    files = ("config.json", "model.safetensors", "tokenizer.json")
    needed = [f"{m}/{f}" for m in ("model_a", "model_b") for f in files]
    if not all((path.parent / f).is_file() for f in [*needed, AUDIT_CORPUS]):
        return None
    return _pair_from_manifest(path.parent, manifest, config)


def _pair_from_manifest(out_dir: Path, manifest: dict[str, Any], config: PlantedPairConfig) -> PlantedPair:
    known = {f.name for f in fields(PairMetrics)}
    return PlantedPair(
        model_a_dir=out_dir / manifest["model_a"],
        model_b_dir=out_dir / manifest["model_b"],
        trigger_prompts=list(manifest["trigger_prompts"]),
        neutral_prompts=list(manifest["neutral_prompts"]),
        planted_continuation=manifest["planted_continuation"],
        trigger_word=manifest["trigger_word"],
        trigger=config.trigger,
        behaviour=config.behaviour,
        response_rate=config.response_rate,
        corpus_path=out_dir / manifest["corpus"],
        config_hash=manifest["config_hash"],
        metrics=PairMetrics(**{k: v for k, v in manifest["metrics"].items() if k in known}),
    )
