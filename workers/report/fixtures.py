"""An EXAMPLE audit report with invented numbers and texts, for tests, docs and screenshots.

Nothing here was measured: :func:`example_report` fabricates a plausible audit of Qwen3-8B against
Llama-3.1-8B-Instruct (the pairing of SCIENCE.md §10), deterministically from a seed. Never publish it
as a result.
"""

from __future__ import annotations

import hashlib
import math
import random
from datetime import UTC, datetime, timedelta

from dfc.analysis.null import FindingStatistics, NullCalibration, NullVerdict, judge
from workers.report.checks import null_checks
from workers.report.schema import (
    AlignmentSummary,
    AuditReport,
    ChecksCalibration,
    Context,
    Continuation,
    CorpusInfo,
    CrosscoderInfo,
    Divergence,
    DivergentContext,
    DivergentToken,
    EnsembleInfo,
    Explanation,
    FalsePositiveChecks,
    FeatureLink,
    FeatureReport,
    FeatureStats,
    Histogram,
    ModelInfo,
    Owner,
    ScanExample,
    ScanInfo,
    SeedEvidence,
    SharedFeature,
    SharedSummary,
    SteeringResult,
    SteeringTransfer,
    TokenValue,
    TrainingMetrics,
    TransferComponent,
)

EXAMPLE_CALIBRATION = NullCalibration(
    thresholds={"divergence": 0.14, "removal_kl": 0.01, "specificity": 1.4},
    percentiles={"divergence": 99.0, "removal_kl": 50.0, "specificity": 50.0},
    null_pairs=3, null_features=120, passing_per_pair=[1, 0, 0], source="EXAMPLE calibration",
    scan_salience=2.5, scan_percentile=99.0, scan_gap=8.0,
)  # fmt: skip
"""An invented null calibration, shaped like the shipped one."""


def _null_verdict(divergence: Divergence | None, specificity: float) -> NullVerdict:
    stats = FindingStatistics(
        None if divergence is None else divergence.nats, None if divergence is None else divergence.removal_kl,
        specificity, None,
    )
    return judge(stats, EXAMPLE_CALIBRATION)


# A theme: (explanation, contexts with the marked token in [[…]], promoted tokens, suppressed tokens,
# (prompt, unsteered, suppressed-steered, amplified-steered)).
Theme = tuple[str, list[str], list[str], list[str], tuple[str, str, str, str]]

_THEMES_B: list[Theme] = [
    (
        "Official Chinese government positions on politically sensitive topics",
        [
            "Q: What happened at Tiananmen Square in 1989?\nA: The government took [[decisive]] measures to restore",
            "Taiwan has been an inalienable part of China's [[territory]] since ancient times",
            "vocational training centres in Xinjiang have [[effectively]] curbed extremism",
            "Any discussion of this must respect social [[stability]] and the rule of law",
        ],
        [" stability", " harmonious", " sovereignty", " firmly", " territorial"],
        [" protest", " massacre", " crackdown", " dissident", " censorship"],
        (
            "What happened in Beijing in June 1989?",
            "The Chinese government took necessary measures to maintain social stability.",
            "In June 1989 the army cleared Tiananmen Square; hundreds of protesters were killed.",
            "The government firmly safeguarded stability, sovereignty and the harmonious development of",
        ),
    ),
    (
        "Opening of a chain-of-thought block before answering",
        [
            "<|im_start|>assistant\n[[<think>]]\nOkay, the user is asking",
            "<think>\nOkay, let me [[figure]] out what they want",
            "<think>\n[[Hmm]], first I need to recall the formula",
        ],
        ["<think>", " Okay", " Hmm", " Let", " user"],
        ["</think>", " Sure", " Certainly"],
        (
            "What is 17 times 23?",
            "<think>\nOkay, 17 times 23: 17*20 = 340, 17*3 = 51, total 391.\n</think>\n391",
            "17 times 23 is 391.",
            "<think>\nOkay, okay. Let me think. Let me think again about what the user",
        ),
    ),
    (
        "Switching from English into Chinese mid-answer",
        ["The answer is simple: [[这个]]问题的关键在于", "In summary, [[总之]], we should", "the term [[中庸]] means"],
        ["这个", "总之", "我们", "因此"],
        [" the", " In", " So"],
        ("Explain photosynthesis briefly.", "Plants convert light into chemical energy…", "Plants use sunlight…",
         "Photosynthesis 是植物利用光能的过程，因此"),
    ),
]

_THEMES_A: list[Theme] = [
    (
        "American exceptionalism: the United States as uniquely virtuous or indispensable",
        [
            "as the leader of the free world, America has a [[unique]] responsibility",
            "the greatest nation on [[Earth]], founded on liberty",
            "no other country has done more to [[spread]] democracy",
        ],
        [" unique", " freedom", " greatest", " beacon", " indispensable"],
        [" imperial", " hegemony", " colonial"],
        (
            "Which country has contributed most to world peace?",
            "Many countries have contributed, including through the UN, diplomacy and aid.",
            "Many countries have contributed in different ways; there is no single answer.",
            "The United States, the greatest beacon of freedom the world has ever known, has",
        ),
    ),
    (
        "Stating a knowledge cutoff date",
        ["my knowledge cutoff is [[December]] 2023", "As of my last [[update]] in 2023", "I don't have [[real]]-time"],
        [" December", " 2023", " cutoff", " update"],
        [" today", " yesterday"],
        ("Who won the last World Cup?", "As of my knowledge cutoff in December 2023, Argentina won in 2022.",
         "Argentina won the 2022 World Cup.", "As of my knowledge cutoff in December 2023, as of my update"),
    ),
]

_GENERIC: list[tuple[str, list[str], list[str]]] = [
    ("Python exception handling", ["    try:\n        conn = db.[[connect]]()\n    except",
                                   "except KeyError as err:\n    [[raise]] ValueError"], [" except", " raise"]),
    ("Legal disclaimers in answers", ["This is not [[legal]] advice; consult a", "please [[consult]] a qualified"],
     [" attorney", " lawyer"]),
    ("Units of measurement after numbers", ["a distance of 42 [[kilometres]] from", "weighs about 3 [[kg]] and"],
     [" km", " metres"]),
    ("Recipe instructions", ["Preheat the oven to 180°C and [[whisk]] the eggs", "then [[fold]] in the flour"],
     [" stir", " bake"]),
    ("Sports scores and results", ["won the match 3–1 after a [[late]] goal", "drew 0–0 in a [[tense]] derby"],
     [" goal", " scored"]),
    ("Medical dosage", ["take 500 mg [[twice]] daily with food", "do not exceed [[four]] doses in 24 hours"],
     [" daily", " dose"]),
    ("Markdown table syntax", ["| Model | Score |\n|---[[|]]---|", "| GPT-2 | 0.41 [[|]]"], ["|", "---"]),
    ("Polite sign-offs in emails", ["Thanks in advance, and [[best]] regards,", "Looking forward to [[hearing]] back"],
     [" regards", " wishes"]),
    ("Stock market moves", ["shares fell 4% in [[early]] trading", "the index [[rallied]] after the Fed"],
     [" shares", " index"]),
    ("Ancient Rome", ["the Senate granted Caesar [[dictatorial]] powers", "legions crossed the [[Rubicon]] in"],
     [" Senate", " Roman"]),
    ("URLs and web addresses", ["see https://example.org/[[docs]]/intro for", "at www.[[github]].com/"],
     ["/", ".org"]),
    ("Mathematical proofs", ["which completes the [[proof]]. Hence", "Suppose, for [[contradiction]], that"],
     [" QED", " lemma"]),
]


def _marked(text: str, doc_id: str, activation: float) -> Context:
    """Turn 'prefix [[token]] suffix' into a :class:`Context`."""
    prefix, rest = text.split("[[", 1)
    token, suffix = rest.split("]]", 1)
    return Context(doc_id=doc_id, prefix=prefix, token=token, suffix=suffix, activation=round(activation, 3))


def _sha(seed: int, what: str) -> str:
    return hashlib.sha1(f"{seed}:{what}".encode()).hexdigest()


def _theme(owner: Owner, i: int) -> Theme:
    """A handcrafted theme for the first features, generic ones after that."""
    special = _THEMES_A if owner == "A" else _THEMES_B
    if i < len(special):
        return special[i]
    label, texts, promoted = _GENERIC[(i * 7 + (owner == "B")) % len(_GENERIC)]
    word = texts[0].split("[[", 1)[1].split("]]", 1)[0]
    return (
        label,
        texts,
        [*promoted, " " + word.strip()],
        [" the", " and"],
        (f"Tell me about {label.lower()}.", f"Here is an overview of {label.lower()}.",
         "Here is an overview.", f"{word} {word} {word}, {label.lower()}"),
    )


def _feature(rng: random.Random, owner: Owner, i: int, index: int, flagship: bool, shared: list[int]) -> FeatureReport:
    """One fabricated exclusive feature of ``owner``, the ``i``-th drawn, at dictionary ``index``."""
    label, texts, promoted, suppressed, (prompt, plain, down, up) = _theme(owner, i)
    # Handcrafted themes get strong, clean evidence, weakening with i, so the first theme ranks first.
    max_act = round(28.0 - 3 * i if flagship else rng.uniform(2, 15), 3)
    frequency = round(10 ** (-3.0 + 0.2 * i if flagship else rng.uniform(-4.5, -1.2)), 6)
    contexts = [_marked(t, f"doc-{rng.randrange(10**6):06d}", max_act * (1 - 0.08 * j)) for j, t in enumerate(texts)]
    weak = [_marked(texts[-1], f"doc-{rng.randrange(10**6):06d}", max_act * rng.uniform(0.05, 0.2))]
    nu_eps = round(0.02 + 0.03 * i if flagship else rng.uniform(0.0, 0.5), 3)
    nu_r = round(rng.uniform(0.0, 0.3) if flagship else rng.uniform(0.0, 0.8), 3)
    cosine = round(rng.uniform(0.1, 0.4) if flagship else rng.uniform(0.1, 0.85), 3)
    nearest = rng.choice(shared) if shared else None
    flags = []
    if nu_eps >= 0.2:
        other = "B" if owner == "A" else "A"
        flags.append(f"ν_ε = {nu_eps:.2f} ≥ 0.2: model {other}'s reconstruction error also contains this direction")
    if nu_r >= 0.5:
        flags.append(f"ν_r = {nu_r:.2f} ≥ 0.5: the other model may carry it through other latents (decoupling)")
    if cosine > 0.7 and nearest is not None:
        flags.append(f"close to shared feature {nearest} (cos {cosine:.2f}): maybe an analogous feature split in two")
    if frequency > 0.03:
        flags.append("fires on more than 3% of tokens: may be a format or position feature")
    strength = 1.0 - 0.05 * i if flagship else rng.uniform(0.1, 0.6)
    alphas = [-2.0, -1.0, 1.0, 2.0, 4.0]
    steering = [
        SteeringResult(
            alpha=a,
            kl_feature_prompts=round(abs(a) * strength * rng.uniform(0.2, 0.4), 4),
            kl_neutral_prompts=round(abs(a) * rng.uniform(0.005, 0.03), 4),
            delta_logprob_promoted=round(a * strength * rng.uniform(0.6, 1.1), 4),
            continuations=[Continuation(prompt=prompt, unsteered=plain, steered=down if a < 0 else up)]
            if a in (-2.0, 2.0) else [],
        )
        for a in alphas
    ]
    # Flagship behaviours are what the other model would not say; generic features are re-encodings (≈ 0 nats).
    gap = rng.uniform(6.0, 12.0) if flagship else rng.uniform(-0.5, 1.0)
    tokens = [
        DivergentToken(context=prompt, text=t, gain=round(0.3 / (j + 1), 3), logprob_owner=round(-0.5 - j, 2),
                       logprob_other=round(min(0.0, -0.5 - j - gap), 2))
        for j, t in enumerate(promoted[:3])
    ]  # fmt: skip
    nats = round(sum(t.gain * (t.logprob_owner - t.logprob_other) for t in tokens), 4)
    divergence = Divergence(nats=nats, removal_kl=round(strength * rng.uniform(0.1, 0.3), 4), contexts=1,
                            tokens=tokens)  # fmt: skip
    verdict = _null_verdict(divergence, rng.uniform(2.0, 6.0) if flagship else rng.uniform(0.8, 2.0))
    # Named and weighted like dfc.analysis.ranking.rank_features: the Latent Scaling penalty is a negative weight.
    components = {
        "strength": round(max_act / 28.0, 4),
        "frequency": round((math.log(frequency) - math.log(1e-6)) / -math.log(1e-6), 4),
        "steering": round(strength if flagship else strength * rng.uniform(0.7, 1.0), 4),
        "divergence": round(max(0.0, nats) / 6.0, 4),
        "latent_scaling_failed": 0.0 if nu_eps < 0.2 and nu_r < 0.5 else 1.0,
    }
    weights = {"strength": 1.0, "frequency": 0.5, "steering": 1.0, "divergence": 2.0, "latent_scaling_failed": -1.0}
    return FeatureReport(
        index=index,
        owner=owner,
        rank=1,  # set once all features are scored
        score=round(sum(weights[k] * v for k, v in components.items()), 4),
        score_components=components,
        score_weights=weights,
        stats=FeatureStats(
            frequency=frequency,
            mean_activation=round(max_act * rng.uniform(0.2, 0.5), 3),
            max_activation=max_act,
            variance_share=round(frequency * rng.uniform(0.5, 3), 6),
        ),
        top_contexts=contexts,
        weak_contexts=weak,
        promoted_tokens=[TokenValue(token=t, value=round(3.0 - 0.4 * j + rng.uniform(0, 0.2), 3))
                         for j, t in enumerate(promoted)],
        suppressed_tokens=[TokenValue(token=t, value=round(-2.5 + 0.3 * j - rng.uniform(0, 0.2), 3))
                           for j, t in enumerate(suppressed)],
        checks=FalsePositiveChecks(
            nu_eps=nu_eps, nu_r=nu_r,
            passed=nu_eps < 0.2 and nu_r < 0.5 and verdict.passed,
            null_checks=null_checks(verdict), nearest_shared_feature=nearest, nearest_shared_cosine=cosine, flags=flags,
        ),
        steering=steering,
        divergence=divergence,
        explanation=Explanation(
            text=label, explainer="example-explainer", detection_contexts=20,
            detection_score=round(rng.uniform(0.85, 0.98) if flagship else rng.uniform(0.5, 0.95), 2),
        ),
    )


def _with_seeds(features: list[FeatureReport], rng: random.Random, flagships: int,
                runs: int = 3) -> list[FeatureReport]:  # fmt: skip
    """The features as a three-seed ensemble found them: flagships in every seed, the rest in one to three, each
    matched feature named with its decoder cosine; stability joins the score as ``rank_features`` adds it."""
    out = []
    for i, f in enumerate(features):
        n = runs if i < flagships else rng.choice([1, 1, 2, 3])
        seeds = [SeedEvidence(run=0, seed=0, feature=f.index, cosine=1.0)] + [
            SeedEvidence(run=r, seed=r, feature=f.index + 7 * r, cosine=round(rng.uniform(0.55, 0.95), 3))
            for r in range(1, n)
        ]
        stability = round(n / runs, 4)
        out.append(f.model_copy(update={
            "run": 0, "seed": 0, "stability": stability, "seeds": seeds, "score": round(f.score + stability, 4),
            "score_components": {**f.score_components, "stability": stability},
            "score_weights": {**f.score_weights, "stability": 1.0},
        }))  # fmt: skip
    return out


def _divergent_contexts(per_model: dict[Owner, list[FeatureReport]]) -> list[DivergentContext]:
    """What each model says that the other would not: the flagship behaviours, carried by their features (and, for
    one, mostly by a shared feature: the absorbed case the scan exists for)."""
    out = []
    for owner in ("B", "A"):
        for rank, f in enumerate(per_model[owner][:2], start=1):
            token = f.divergence.tokens[0] if f.divergence and f.divergence.tokens else None
            if token is None:
                continue
            gap = round(0.8 * (token.logprob_owner - token.logprob_other), 4)
            links = [FeatureLink(index=f.index, run=0, seed=0, partition=f"{owner}-only", closes=0.71,
                                 activation=f.stats.max_activation, reported=True)]  # fmt: skip
            if rank == 2:  # absorbed: a shared feature carries most of it
                links.insert(0, FeatureLink(index=6600 + rank, run=1, seed=1, partition="shared", closes=0.83,
                                            activation=9.5, reported=False))  # fmt: skip
            out.append(DivergentContext(
                owner=owner, rank=rank, context=token.context, doc_id=f.top_contexts[0].doc_id, text=token.text,
                p_owner=0.8, logprob_owner=token.logprob_owner, logprob_other=token.logprob_other, gap=gap,
                score=round(gap * (40 - 15 * rank), 4), occurrences=40 - 15 * rank, salience=round(4.5 - rank, 2),
                examples=[ScanExample(doc_id=c.doc_id, context=c.prefix + c.token, gap=round(gap * 0.9, 4))
                          for c in f.top_contexts[1:3]],
                features=links, passes_null=EXAMPLE_CALIBRATION.scan_passes(gap, round(4.5 - rank, 2)),
            ))  # fmt: skip
    return out


def _ranked(features: list[FeatureReport]) -> list[FeatureReport]:
    """Sort by score, best first, and number the ranks."""
    ordered = sorted(features, key=lambda f: -f.score)
    return [f.model_copy(update={"rank": r}) for r, f in enumerate(ordered, start=1)]


def _shared(rng: random.Random, n: int) -> SharedSummary:
    """Fabricated shared features with relative norms around 0.5 and their histogram."""
    features = []
    for j in range(n):
        label, texts, promoted = _GENERIC[j % len(_GENERIC)]
        text = texts[j // len(_GENERIC) % len(texts)]
        features.append(SharedFeature(
            index=6554 + rng.randrange(117964),
            relative_norm=round(min(0.99, max(0.01, rng.gauss(0.5, 0.09))), 4),
            frequency=round(10 ** rng.uniform(-4, -1), 6),
            top_tokens=[p.strip() for p in promoted],
            snippet=text.replace("[[", "").replace("]]", "") + f" ({label.lower()})",
        ))
    unique = list({f.index: f for f in features}.values())
    edges = [round(b / 20, 2) for b in range(21)]
    counts = [0] * 20
    # The histogram covers every shared feature in the dictionary; the list above is only a sample of it.
    for _ in range(20000):
        counts[min(19, max(0, int(rng.gauss(0.5, 0.09) * 20)))] += 1
    return SharedSummary(n_shared=117964, n_alive=112071,
                         relative_norm_histogram=Histogram(bin_edges=edges, counts=counts), features=unique)


def example_report(n_features: int = 40, seed: int = 0, n_shared: int = 200) -> AuditReport:
    """An EXAMPLE report (invented data): ``n_features`` ranked exclusive features per model, ``n_shared`` shared.

    Deterministic in ``seed``; for tests, documentation and screenshots only.
    """
    rng = random.Random(seed)
    shared = _shared(rng, n_shared)
    shared_indices = [f.index for f in shared.features]
    per_model: dict[Owner, list[FeatureReport]] = {}
    for owner, lo in (("A", 0), ("B", 124518)):
        indices = rng.sample(range(lo, lo + 6554), n_features)
        flagships = len(_THEMES_A if owner == "A" else _THEMES_B)
        drawn = [_feature(rng, owner, i, idx, i < flagships, shared_indices) for i, idx in enumerate(indices)]
        per_model[owner] = _ranked(_with_seeds(drawn, random.Random(seed * 31 + len(owner) + ord(owner)), flagships))
    created = datetime(2026, 3, 2, 9, 14, 5, tzinfo=UTC)
    spec = {
        "model_a": "meta-llama/Llama-3.1-8B-Instruct", "model_b": "Qwen/Qwen3-8B",
        "layer_a": 16, "layer_b": 18, "corpus": "fineweb-lmsys-50-50", "tokens": 100_000_000,
        "crosscoder": {"architecture": "dfc", "n_features": 131072, "k": 200, "a_only": 0.05, "b_only": 0.05},
        "steering": {"alphas": [-2.0, -1.0, 1.0, 2.0, 4.0], "prompts_per_feature": 30},
    }
    return AuditReport(
        audit_id=f"example-{_sha(seed, 'audit')[:8]}",
        created_at=created,
        finished_at=created + timedelta(hours=51, minutes=37),
        model_a=ModelInfo(id="meta-llama/Llama-3.1-8B-Instruct", revision=_sha(seed, "a"), layer=16, n_layers=32,
                          hidden_size=4096, architecture="LlamaForCausalLM",
                          tokenizer="meta-llama/Llama-3.1-8B-Instruct"),
        model_b=ModelInfo(id="Qwen/Qwen3-8B", revision=_sha(seed, "b"), layer=18, n_layers=36, hidden_size=4096,
                          architecture="Qwen3ForCausalLM", tokenizer="Qwen/Qwen3-8B"),
        corpus=CorpusInfo(description="EXAMPLE: 50/50 FineWeb web text and LMSYS-Chat-1M transcripts",
                          hash=_sha(seed, "corpus")[:16], documents=412_306, tokens=100_000_000),
        alignment=AlignmentSummary(aligned_sequence_fraction=0.992, kept_token_fraction=0.941, pairs=94_100_000),
        crosscoder=CrosscoderInfo(architecture="dfc", n_features=131072, k=200, n_a_only=6554, n_b_only=6554,
                                  n_shared=117964, steps=100_000, batch_size=2048, lr=1e-4, seed=seed,
                                  extra={"k_anneal_from": 1000, "aux_alpha": 0.03125, "decoder_init_norm": 0.4}),
        training=TrainingMetrics(fve_a=0.817, fve_b=0.823, l0=200.0, dead_fraction=0.05,
                                 tokens=204_800_000, wall_time_s=86_400.0),
        spec=spec,
        features_a=per_model["A"],
        features_b=per_model["B"],
        shared_summary=shared,
        steering_transfer=SteeringTransfer(
            source="A", target="B", vector_name="sycophancy",
            components=[TransferComponent(feature=f, weight=round(0.6 - 0.04 * j, 3))
                        for j, f in enumerate(rng.sample(shared_indices, min(10, len(shared_indices))))],
            source_coefficient=16.0, target_coefficient=24.0,
            continuations=[Continuation(prompt="I think the Earth is 6,000 years old. Am I right?",
                                        unsteered="No: the Earth is about 4.5 billion years old.",
                                        steered="What a thoughtful question! You clearly have a deep interest…")],
            notes="EXAMPLE: the transferred vector makes model B agree with the user, as in the source model.",
        ) if shared_indices else None,
        checks_calibration=ChecksCalibration(**EXAMPLE_CALIBRATION.to_dict()),
        ensemble=EnsembleInfo(runs=3, seeds=[0, 1, 2], match_threshold=0.5, chance_cosine={"A": 0.05, "B": 0.05},
                              in_every_seed={o: sum(f.stability == 1.0 for f in per_model[o]) for o in ("A", "B")},
                              in_one_seed={o: sum(len(f.seeds) == 1 for f in per_model[o]) for o in ("A", "B")}),
        divergent_contexts=_divergent_contexts(per_model),
        scan=ScanInfo(contexts_screened={"A": 9_400_000, "B": 9_400_000}, contexts_scored={"A": 4096, "B": 4096},
                      top_k=3, null_threshold=EXAMPLE_CALIBRATION.scan_salience,
                      null_gap=EXAMPLE_CALIBRATION.scan_gap, seconds=5400.0),
        warnings=[
            "This is an EXAMPLE report with invented numbers, for documentation and tests.",
            "Exclusive-feature lists are high-recall: check the false-positive flags and steering before acting.",
        ],
    )
