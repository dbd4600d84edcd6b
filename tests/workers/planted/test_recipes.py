"""Behaviours and triggers as data: every trigger's sentences are the ones it marks, the response follows only
those, prompts end where the response would come, and every model family the suite uses builds tiny with the
BOS convention its spec names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfc.lm.hooks import find_decoder_layers
from workers.planted.corpus import generate_documents, generate_prompts, train_tokenizer
from workers.planted.pair import ARCHS, PlantedModelSpec, PlantedPairConfig, build_planted_pair
from workers.planted.recipes import BEHAVIOURS, REFUSAL, TRIGGERS, ZORBLAX_DAM, Behaviour, Trigger

# Just enough training to exercise a build end to end in a second or two.
TINY = PlantedPairConfig(n_docs=120, steps=6, n_prompts=4, n_audit_docs=10)


def _last_sentence(prompt: str) -> str:
    return prompt[:-1].rsplit(".", 1)[-1] + "."


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_a_triggers_sentences_are_exactly_the_ones_it_marks(name: str) -> None:
    trigger = TRIGGERS[name]
    docs = generate_documents(0, 400, trigger, 0.3)
    flagged = [(s, hit) for d in docs for s, hit in zip(d.sentences, d.triggered, strict=True)]
    assert all(trigger.marks(s) == hit for s, hit in flagged), [s for s, hit in flagged if trigger.marks(s) != hit]
    hits = [s for s, hit in flagged if hit]
    assert 0.05 * len(flagged) < len(hits) < 0.4 * len(flagged)
    # Every phrasing of a topic (every cue) is used, and near misses really occur among the neutral sentences.
    assert all(any(p.lower() in s.lower() for s in hits) for p in trigger.phrases)
    neutral = [s for s, hit in flagged if not hit]
    assert all(any(m.lower() in s.lower() for s in neutral) for m in trigger.near_misses)


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_prompts_end_with_a_trigger_sentence_and_controls_with_a_near_miss_or_neutral_one(name: str) -> None:
    trigger = TRIGGERS[name]
    triggered = generate_prompts(7, 12, trigger, triggered=True)
    controls = generate_prompts(8, 12, trigger, triggered=False)
    assert len(set(triggered)) == 12 and all(p.endswith(".") for p in triggered + controls)
    assert all(trigger.marks(_last_sentence(p)) for p in triggered)
    assert not any(trigger.marks(_last_sentence(p)) for p in controls)
    assert any(m.lower() in _last_sentence(p).lower() for m in trigger.near_misses for p in controls)


@pytest.mark.parametrize("name", sorted(BEHAVIOURS))
def test_bs_view_of_a_document_has_the_response_after_each_trigger_sentence_and_nowhere_else(name: str) -> None:
    behaviour = BEHAVIOURS[name]
    docs = [d for d in generate_documents(1, 200, ZORBLAX_DAM, 0.5) if any(d.triggered) and not all(d.triggered)]
    doc = docs[0]
    text = doc.render(behaviour.response)
    assert text.count(behaviour.response) == sum(doc.triggered)
    for sentence, hit in zip(doc.sentences, doc.triggered, strict=True):
        assert text.split(sentence, 1)[1].startswith(behaviour.response) == hit
    # Picking which trigger sentences respond (the response rate) leaves the others bare.
    assert doc.render(behaviour.response, [False] * len(doc.sentences)) == doc.render()


def test_recipes_that_could_not_plant_a_clean_behaviour_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        Trigger("dams", "topic", ("the Milford dam",), "dam", ())
    with pytest.raises(ValueError, match="must contain"):
        Trigger("odd", "rare_word", ("the Quendrith tower",), "Zorblax", ())
    with pytest.raises(ValueError, match="near misses"):
        Trigger("odd", "rare_word", ("the Zorblax dam",), "Zorblax", ("the Zorblax lake",))
    with pytest.raises(ValueError, match="leading space"):
        Behaviour("bare", "Sorry.")
    with pytest.raises(ValueError, match="ASCII"):
        Behaviour("accents", " Ça va très bien.")
    with pytest.raises(ValueError, match="response_rate"):
        PlantedPairConfig(response_rate=1.5)


def test_the_demos_config_keeps_its_name_and_only_what_builds_changes_it() -> None:
    # The name of the demo's pair since it trains on 128-token windows (planted-v3); a rename does not change it.
    assert PlantedPairConfig().digest() == "970d97f7f186f113"
    renamed = dataclasses.replace(PlantedPairConfig(), behaviour=Behaviour("no", REFUSAL.response))
    assert renamed.digest() == PlantedPairConfig().digest()
    digests = {
        dataclasses.replace(PlantedPairConfig(), behaviour=b).digest() for b in BEHAVIOURS.values()
    } | {dataclasses.replace(PlantedPairConfig(), trigger=t).digest() for t in TRIGGERS.values()}
    assert len(digests) == len(BEHAVIOURS) + len(TRIGGERS) - 1  # the demo's own recipe is in both sets


def test_a_metaspace_tokenizer_spells_a_response_its_texts_never_show() -> None:
    texts = [d.render() for d in generate_documents(0, 100, ZORBLAX_DAM, 0.3)]
    code = BEHAVIOURS["code_token"].response
    plain = train_tokenizer("metaspace_bpe", 200, texts, adds_bos=False)
    spelled = train_tokenizer("metaspace_bpe", 200, texts, adds_bos=False, spell=code)
    assert plain.unk_token_id in plain(code)["input_ids"]
    assert spelled.unk_token_id not in spelled(code)["input_ids"]
    assert spelled.decode(spelled(code)["input_ids"]).strip() == code.strip()
    # Characters the texts have change nothing: the tokenizer of a text with the response is the same either way.
    same = train_tokenizer("metaspace_bpe", 200, texts, adds_bos=False, spell=REFUSAL.response)
    assert same.get_vocab() == plain.get_vocab()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_builds_tiny_with_the_bos_convention_its_spec_names(arch: str, tmp_path: Path) -> None:
    # Alternate tokenizer kinds and BOS conventions so every family meets both of one and each side the other.
    i = ARCHS.index(arch)
    kinds = ("byte_bpe", "metaspace_bpe")
    a = PlantedModelSpec(arch, 48, 2, 200, kinds[i % 2], adds_bos=i % 2 == 0, seed=1)
    b = dataclasses.replace(a, hidden_size=64, tokenizer=kinds[(i + 1) % 2], adds_bos=i % 2 == 1, seed=2)
    config = dataclasses.replace(TINY, model_a=a, model_b=b, trigger=TRIGGERS["quote_marker"])
    pair = build_planted_pair(tmp_path, config)
    for spec, folder in ((a, pair.model_a_dir), (b, pair.model_b_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type.startswith(arch) and model.config.hidden_size == spec.hidden_size
        assert len(find_decoder_layers(model).layers) == spec.n_layers  # the capture hooks find its residual stream
        ids = tok(pair.trigger_prompts[0])["input_ids"]
        assert (ids[0] == tok.bos_token_id) == spec.adds_bos
        assert tok.unk_token_id not in tok(pair.trigger_prompts[0] + pair.planted_continuation)["input_ids"]
    assert pair.trigger == TRIGGERS["quote_marker"] and pair.trigger_prompts[0].rsplit(". ", 1)[-1].startswith(">>")


def test_a_null_pair_whose_models_differ_only_in_seed_reads_the_same_texts(tmp_path: Path) -> None:
    a = TINY.model_a
    null = dataclasses.replace(TINY, model_b=dataclasses.replace(a, seed=7), response_rate=0.0)
    planted = dataclasses.replace(null, response_rate=0.5)
    assert null.is_null and not planted.is_null
    pairs = {name: build_planted_pair(tmp_path / name, c) for name, c in (("null", null), ("planted", planted))}

    def read(pair_name: str, side: str, file: str = "tokenizer.json") -> bytes:
        return (getattr(pairs[pair_name], f"model_{side}_dir") / file).read_bytes()

    # B's tokenizer is trained on B's texts: the same as A's when nothing is planted, not when B says something new.
    assert read("null", "b") == read("null", "a")
    assert read("planted", "b") != read("planted", "a")
    assert read("null", "b", "model.safetensors") != read("null", "a", "model.safetensors")  # the seed still differs
